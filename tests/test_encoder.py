"""The text encoder: its weight type (bfloat16 where the CPU or GPU has bfloat16 matrix units,
float32 elsewhere, and the same vectors either way to within what ranking can tell), and its
passes cut longest text first with the rows kept in the caller's order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch

from models.encoder import TextEncoder, pick_dtype
from streams.settings import Settings

QUERIES = ["space telescope images of distant galaxies", "a slow jazz piano record",
           "how to bake sourdough bread", "red wine from tuscany", "football world cup final"]
CORPUS = ["Hubble: the deep field, galaxies billions of years old", "Late-night jazz trio",
          "Bread baking for beginners: starters and loaves", "Chianti and other Italian wines",
          "The greatest football matches ever played", "Knitting patterns for winter",
          "Tax law explained", "Mountain hiking trails of the Alps"]


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (not as torch does)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_named_types_are_taken_as_given_and_others_refused():
    cpu = torch.device("cpu")
    assert pick_dtype("float32", cpu) is torch.float32
    assert pick_dtype("bfloat16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="'float16': use auto, float32 or bfloat16"):
        pick_dtype("float16", cpu)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's CPU flags")
def test_auto_is_bfloat16_exactly_where_the_cpu_has_amx():
    native = "amx_tile" in cpu_flags()  # AVX512-BF16 alone was slower than float32
    assert pick_dtype("auto", torch.device("cpu")) is (torch.bfloat16 if native
                                                      else torch.float32)


def test_bfloat16_vectors_rank_as_float32_vectors_do(encoder):
    fp32 = encoder if encoder.dtype is torch.float32 else TextEncoder(device="cpu",
                                                                       dtype="float32")
    bf16 = TextEncoder(device="cpu", dtype="bfloat16")
    assert bf16.model.dtype is torch.bfloat16 and fp32.model.dtype is torch.float32
    a, b = fp32.encode(QUERIES + CORPUS), bf16.encode(QUERIES + CORPUS)
    assert b.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cosine = (a * b).sum(1)
    assert cosine.min() > 0.99, cosine
    # each query's nearest corpus text is the same under both types (and the intended one)
    n = len(QUERIES)
    best = [(x[:n] @ x[n:].T).argmax(1).tolist() for x in (a, b)]
    assert best[0] == best[1] == list(range(n))


def test_length_sorted_passes_give_each_text_its_own_vector_in_order(encoder):
    texts = ["", *QUERIES[:2], CORPUS[2] * 3, "jazz", *CORPUS[:3]]  # lengths out of order
    alone = np.concatenate([encoder.encode([t]) for t in texts])
    encoder.batch_size, size = 3, encoder.batch_size
    try:
        batched = encoder.encode(texts)
    finally:
        encoder.batch_size = size
    np.testing.assert_allclose(batched, alone, atol=2e-2 if encoder.dtype is torch.bfloat16
                               else 1e-5)


def test_an_unknown_type_is_refused_by_name():
    with pytest.raises(pydantic.ValidationError, match="encoder_dtype"):
        Settings(encoder_dtype="float16")
