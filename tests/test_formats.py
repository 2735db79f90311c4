"""Every stored or exchanged format decodes from bytes written by the code that wrote them.

tests/fixtures/formats/ holds small files of each format version (tests/fixtures/
make_formats.py says where each came from). A change that makes any of them unreadable, or
reads them differently, fails here: user states in RocksDB and the changelog, checkpoints,
snapshots, training examples and item vectors all outlive the code that wrote them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from models.config import LearnerConfig
from models.examples import TrainingExample
from models.model import SharedModel
from models.snapshot import apply_base, apply_delta, read_meta
from models.trainer import Trainer, restore
from models.user_state import UserState, item_keys
from streams.catalog import decode_item_vector

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
T0 = 1_700_000_000_000
TINY = LearnerConfig(dim=4, history_len=4, encoder_window=4, n_heads=2, device="cpu", seed=0,
                     replay_capacity=16)


def raw(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@pytest.mark.parametrize("version", [1, 2])
def test_user_state_of_every_version(version):
    st = UserState.from_bytes(raw(f"user_state_v{version}.json"))
    assert st.items == ["item-1", None, "item-ü/2"]
    assert st.types == [1, 6, 4] and st.ts == [T0, T0 + 1000, T0 + 2000]
    np.testing.assert_allclose(st.text_vector(1), np.linspace(-1, 1, 8), atol=1e-3)
    np.testing.assert_array_equal(st.residual, [0.5, -0.25, 0.125, 1.0])
    r = st.rule
    assert (r.alpha, r.accum, r.loss_ema, r.loss_var, r.steps, st.n_events) == \
        (0.0125, 4.5, 3.25, 0.5, 7, 3)
    assert st.offsets == {"0": 41, "3": 7} and st.already_applied(0, 41)
    # v1 knew only the history ring: that is what it counts as seen
    assert st.seen.contains(item_keys(["item-1", "item-ü/2", "item-9"])).tolist() == \
        [True, True, False]
    again = UserState.from_bytes(st.to_bytes())  # written back in today's version
    assert orjson.loads(st.to_bytes())["v"] == 2 and again.seen == st.seen


def test_user_state_today_writes_the_v2_fixture_byte_for_byte():
    st = UserState.from_bytes(raw("user_state_v2.json"))
    assert st.to_bytes() == raw("user_state_v2.json")


@pytest.mark.parametrize("name", ["item_vector_v0.json", "item_vector_v1.json"])
def test_item_vector_records(name):
    item_id, (vec, _, fingerprint) = decode_item_vector(raw(name))
    assert item_id == "item-1"
    assert fingerprint == 0  # written before records carried one: embedded again if re-sent
    np.testing.assert_array_equal(vec, np.linspace(0, 1, 8).astype(np.float32))


def test_item_vector_of_an_unknown_format_is_refused():
    with pytest.raises(ValueError):
        decode_item_vector(orjson.dumps({"format": 2, "item_id": "x", "v": ""}))


@pytest.mark.parametrize("version", [1, 2])
def test_training_examples(version):
    """v1 carried no seen set (read as none: the loss leaves out the history alone); v2
    carries the user's seen keys, here its three earlier items."""
    ex = TrainingExample.from_bytes(raw(f"training_example_v{version}.json"))
    assert ex.user_id == "u1" and ex.source == (0, 3) and ex.target == "item-3"
    assert ex.items == ["item-0", "item-1", "item-2"] and ex.weight == 1.0
    if version == 1:
        assert ex.seen is None
    else:
        assert sorted(ex.seen.tolist()) == sorted(item_keys(ex.items).tolist())
        assert ex.to_bytes() == raw("training_example_v2.json")


def test_snapshot_base_then_delta_v1():
    model = SharedModel(TINY, text_dim=8)
    base = apply_base(model, raw("snapshot_base_v1.safetensors"))
    assert base.kind == "base" and model.catalog.ids[1:] == [f"item-{k}" for k in range(5)]
    delta = apply_delta(model, raw("snapshot_delta_v1.safetensors"))
    assert (delta.version, delta.covered, delta.trained) == (1, {0: 5, 1: 5}, 12)
    assert model.version == 1 and model.covis.n.sum() == 12 and model.counts.sum() == 12
    meta, _ = read_meta(raw("snapshot_delta_v1.safetensors"))
    assert meta == delta


def test_trainer_checkpoint_v1():
    trainer = Trainer(SharedModel(TINY, text_dim=8))
    meta = restore(trainer, raw("trainer_checkpoint_v1.safetensors"))
    assert meta["positions"] == '{"0": 6, "1": 6}'
    assert trainer.trained == 12 and trainer.steps == 1
    assert trainer.progress == {0: 5, 1: 5}


def test_the_previous_releases_worker_checkpoint_is_imported_by_the_trainer():
    """An upgrade keeps the learned model: the trainer takes a streamrec-learner-1
    checkpoint's parameters, optimizer moments and co-visitation counts."""
    from safetensors.torch import load as st_load

    trainer = Trainer(SharedModel(TINY, text_dim=8))
    meta = restore(trainer, raw("learner_checkpoint_v1.safetensors"))
    assert meta["format"] == "streamrec-learner-1" and trainer.trained == 0
    old = st_load(raw("learner_checkpoint_v1.safetensors"))
    m = trainer.model
    np.testing.assert_array_equal(m.items.E.detach()[1:6].numpy(),
                                  old["param.items.E"][1:6].numpy())
    np.testing.assert_array_equal(dict(m.named_parameters())["users.out.weight"].detach(),
                                  old["param.users.out.weight"])
    assert m.covis.n.sum() == old["covis.n"].numpy().sum() == 12
    assert m.covis.F.sum() == pytest.approx(float(old["covis.F.data"].sum()))
    assert m.counts.sum() == 12
