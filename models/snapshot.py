"""Snapshots: how the trainer's shared model reaches the serving workers, versioned.

The trainer publishes version v as either

- a **base**: every parameter, the catalog's ids in the trainer's row order, the popularity
  and co-visitation counts, in full; or
- a **delta** from version v-1: the dense parameters (small: the towers' layers and the
  ranker), the item-embedding rows that moved, and the co-visitation and popularity counts
  added since v-1.

A server loads the newest base, then applies every later delta in version order, each
exactly once (`apply_delta` takes v only at version v-1): its counts are then those of the
trainer at that version, so co-visitation counts are exactly-once on every server, whoever
started when. Parameters are absolute values, so applying them is idempotent anyway.

Items are named by id (rows are local, models/items.py): a server gives an id it has not
seen yet a row, which goes live when the catalog's text vector arrives. Every snapshot
records the trainer's progress (`covered`: per source partition, the newest offset whose
pairs the counts include), which a restarted trainer resumes counting from. The wire form
is safetensors (no pickle) with a format version.

>>> from models.config import LearnerConfig
>>> a, b = SharedModel(LearnerConfig(dim=8)), SharedModel(LearnerConfig(dim=8))
>>> a.upsert_items(["x", "y"], np.ones((2, 384), np.float32))
>>> a.version = 3
>>> meta = apply_base(b, encode_base(a, {0: 41}))
>>> b.version, b.catalog.ids[1:], meta.covered
(3, ['x', 'y'], {0: 41})
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.torch import save as st_save

from models.covisit import Increment
from models.model import SharedModel

FORMAT = "streamrec-snapshot-1"
#: Config fields that change parameter shapes: a snapshot only loads into the same ones.
STRUCTURAL = ("dim", "history_len", "item_tower", "user_tower", "n_layers", "n_heads",
              "covisit", "covisit_recencies")


@dataclass(frozen=True)
class SnapshotMeta:
    kind: str  # base | delta
    version: int
    covered: dict[int, int]  # source partition -> newest offset the counts include
    created_ms: int  # when the trainer made it (snapshot age = now - this)
    trained: int  # examples the trainer had trained


def structural(model: SharedModel) -> str:
    return json.dumps({k: getattr(model.cfg, k) for k in STRUCTURAL} | {
        "text_dim": model.text_dim}, sort_keys=True)


def _meta(model: SharedModel, kind: str, version: int, covered: dict[int, int],
          ids: Sequence[str], trained: int) -> dict[str, str]:
    return {"format": FORMAT, "kind": kind, "version": str(version),
            "config": structural(model), "ids": json.dumps(list(ids)),
            "covered": json.dumps({str(p): o for p, o in covered.items()}),
            "created_ms": str(int(time.time() * 1000)), "trained": str(trained),
            "scenarios": json.dumps(model.scenarios.names[1:])}


def read_header(data: bytes) -> tuple[dict[str, Any], memoryview]:
    """A safetensors payload's JSON header (`__metadata__`, then each tensor's dtype, shape
    and byte range) and the bytes after it. The format: an 8-byte little-endian header
    length, the header, the bytes."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), memoryview(data)[8 + n :]


def read_meta(data: bytes) -> tuple[SnapshotMeta, dict[str, str]]:
    return _snapshot_meta(read_header(data)[0])


def _snapshot_meta(header: dict[str, Any]) -> tuple[SnapshotMeta, dict[str, str]]:
    raw = header.get("__metadata__", {})
    if raw.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} snapshot (format {raw.get('format')!r})")
    meta = SnapshotMeta(raw["kind"], int(raw["version"]),
                        {int(p): o for p, o in json.loads(raw["covered"]).items()},
                        int(raw["created_ms"]), int(raw["trained"]))
    return meta, raw


#: safetensors dtype names -> numpy's (those numpy has; a snapshot holds a few of them)
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def load_tensors(header: dict[str, Any], body: memoryview) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors payload, from its `read_header`.

    Not `safetensors.torch.load`: it copies every tensor while holding the GIL, and a
    1M-item base snapshot applied in a worker's model-step thread held the worker's event
    loop for 0.24 s with it. Here each tensor is a numpy view of `data` copied by numpy,
    which lets the GIL go (288 MB of tensors: 0.17 s holding the GIL against 0.08 s not,
    measured in a thread beside a GIL watchdog).

    >>> data = st_save({"a": torch.arange(6).reshape(2, 3), "e": torch.zeros(0)})
    >>> t = load_tensors(*read_header(data))
    >>> t["a"].tolist(), t["e"].shape
    ([[0, 1, 2], [3, 4, 5]], torch.Size([0]))
    """
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {t['dtype']}, which no snapshot holds")
        first, end = t["data_offsets"]
        view = np.frombuffer(body[first:end], _DTYPES[t["dtype"]]).reshape(t["shape"])
        out[name] = torch.from_numpy(np.array(view))
    return out


def _dense(model: SharedModel) -> dict[str, torch.Tensor]:
    return {f"param.{n}": p.detach().cpu().contiguous()
            for n, p in model.named_parameters() if n != "items.E"}


# ---------------------------------------------------------------- writing (the trainer)
def encode_base(model: SharedModel, covered: dict[int, int], trained: int = 0) -> bytes:
    n = len(model.catalog.ids)
    tensors = _dense(model) | {"E": model.items.E.detach()[:n].cpu().contiguous(),
                               "counts": torch.as_tensor(model.counts[:n].copy())}
    if model.covis is not None:  # the counts of exactly the rows the ids name
        tensors |= {f"covis.{k}": torch.as_tensor(v) for k, v in model.covis.arrays(n).items()}
    return st_save(tensors, metadata=_meta(model, "base", model.version, covered,
                                           model.catalog.ids, trained))


def encode_delta(model: SharedModel, version: int, touched: set[int],
                 covis: Sequence[Increment | tuple[np.ndarray, np.ndarray]],
                 covered: dict[int, int], trained: int = 0) -> bytes:
    """Version `version` = version - 1 plus the E rows `touched` and the co-visitation
    changes `covis` in order: increments (consecutive ones summed per item pair) and pruned
    (j, i) pairs (models/covisit.py `prune`)."""
    segments = _segments(covis)
    moved = np.array(sorted(touched), np.int64)
    named = [np.concatenate([seg.j, seg.i, seg.targets] if kind == "add" else list(seg))
             for kind, seg in segments]
    rows = np.unique(np.concatenate([moved, *named]))

    def local(x: np.ndarray) -> torch.Tensor:  # positions in `rows` (the delta's ids)
        return torch.as_tensor(np.searchsorted(rows, x).astype(np.int32))

    tensors = _dense(model) | {"E.rows": local(moved),
                               "E": model.items.E.detach()[moved].cpu().contiguous()}
    ops = []
    for k, (kind, seg) in enumerate(segments):
        ops.append(kind)
        if kind == "add":
            tensors |= {f"{k}.j": local(seg.j), f"{k}.i": local(seg.i),
                        f"{k}.w": torch.as_tensor(seg.w), f"{k}.targets": local(seg.targets),
                        f"{k}.n": torch.as_tensor(seg.n)}
        else:
            tensors |= {f"{k}.j": local(seg[0]), f"{k}.i": local(seg[1])}
    meta = _meta(model, "delta", version, covered, model.catalog.ids_of(rows), trained)
    return st_save(tensors, metadata=meta | {"ops": json.dumps(ops)})


def _segments(covis: Sequence[Increment | tuple[np.ndarray, np.ndarray]]
              ) -> list[tuple[str, Any]]:
    """Runs of increments summed into one ("add"), and prunes ("prune"), in order."""
    out: list[tuple[str, Any]] = []
    run: list[Increment] = []
    for op in list(covis) + [None]:
        if isinstance(op, Increment):
            run.append(op)
            continue
        if run:
            out.append(("add", _summed(run)))
            run = []
        if op is not None:
            out.append(("prune", op))
    return out


def _summed(increments: Sequence[Increment]) -> Increment:
    """All increments as one, each (j, i) pair and each target once."""
    if not increments:
        z = np.zeros(0, np.int64)
        return Increment(z, z, np.zeros(0, np.float32), z, z)
    j, i, w, t, n = (np.concatenate([getattr(x, f) for x in increments])
                     for f in Increment._fields)
    size = int(max(j.max(initial=0), i.max(initial=0))) + 1
    pairs = sp.coo_matrix((w, (j, i)), shape=(size, size)).tocsr().tocoo()  # sums duplicates
    targets, where = np.unique(t, return_inverse=True)
    counts = np.bincount(where, weights=n).astype(np.int64)
    return Increment(pairs.row.astype(np.int64), pairs.col.astype(np.int64),
                     pairs.data.astype(np.float32), targets, counts)


# ---------------------------------------------------------------- reading (a server)
def _check(model: SharedModel, raw: dict[str, str]) -> list[str]:
    if raw["config"] != structural(model):
        raise ValueError(f"snapshot shape config {raw['config']} != this model's "
                         f"{structural(model)}")
    return json.loads(raw["ids"])


def _set_dense(model: SharedModel, tensors: dict[str, torch.Tensor], raw: dict[str, str]
               ) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n == "scenarios.P":
                model.scenarios.load(tensors.get("param.scenarios.P"),
                                     json.loads(raw.get("scenarios", "[]")))
            elif n != "items.E":
                p.copy_(tensors[f"param.{n}"].to(model.device))


def apply_base(model: SharedModel, data: bytes) -> SnapshotMeta:
    """Load a base snapshot: parameters, rows and counts become the trainer's."""
    header, body = read_header(data)
    meta, raw = _snapshot_meta(header)
    if meta.kind != "base":
        raise ValueError(f"version {meta.version} is a {meta.kind}, not a base")
    ids = _check(model, raw)
    tensors = load_tensors(header, body)
    rows = model.add_rows(ids[1:])  # row 0 of the trainer is padding
    _set_dense(model, tensors, raw)
    with torch.no_grad():
        model.items.E[torch.as_tensor(rows)] = tensors["E"][1:].to(model.device)
    model.counts[:] = 0.0
    model.counts[rows] = tensors["counts"].numpy()[1:]
    if model.covis is not None:
        load_covis(model, rows, {k[6:]: v.numpy() for k, v in tensors.items()
                                  if k.startswith("covis.")})
    model.version = meta.version
    return meta


def load_covis(model: SharedModel, rows: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
    """The trainer's counts, re-indexed from its rows to this model's."""
    to = np.concatenate([[0], rows])  # trainer row -> this model's row
    size = max(model.catalog.capacity, int(to.max()) + 1)
    n = np.zeros(size)
    n[to] = arrays["n"][: len(to)]
    out = {"n": n}
    for name in ("C", "F"):
        m = sp.csr_matrix((arrays[f"{name}.data"], arrays[f"{name}.indices"],
                           arrays[f"{name}.indptr"]), shape=(len(to), len(to))).tocoo()
        m = sp.csr_matrix((m.data, (to[m.row], to[m.col])), shape=(size, size))
        out[f"{name}.data"], out[f"{name}.indices"], out[f"{name}.indptr"] = \
            m.data, m.indices, m.indptr
    model.covis.load_arrays(out)


def apply_delta(model: SharedModel, data: bytes) -> SnapshotMeta:
    """Apply version v on top of version v-1 (raises on any other version)."""
    header, body = read_header(data)
    meta, raw = _snapshot_meta(header)
    if meta.kind != "delta" or meta.version != model.version + 1:
        raise ValueError(f"cannot apply {meta.kind} v{meta.version} on v{model.version}")
    ids = _check(model, raw)
    tensors = load_tensors(header, body)
    rows = model.add_rows(ids) if ids else np.zeros(0, np.int64)

    def mapped(key: str) -> np.ndarray:
        idx = tensors[key].numpy().astype(np.int64)
        return rows[idx] if len(idx) else np.zeros(0, np.int64)

    _set_dense(model, tensors, raw)
    with torch.no_grad():
        model.items.E[torch.as_tensor(mapped("E.rows"))] = tensors["E"].to(model.device)
    for k, kind in enumerate(json.loads(raw.get("ops", "[]"))):
        if kind == "prune":
            model.covis.remove(mapped(f"{k}.j"), mapped(f"{k}.i"))
            continue
        inc = Increment(mapped(f"{k}.j"), mapped(f"{k}.i"), tensors[f"{k}.w"].numpy(),
                        mapped(f"{k}.targets"), tensors[f"{k}.n"].numpy())
        if model.covis is not None:
            model.covis.add(inc)
        np.add.at(model.counts, inc.targets, inc.n.astype(np.float64))
    model.version = meta.version
    return meta
