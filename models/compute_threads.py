"""The cap on the learner's compute threads: torch's and FAISS's OpenMP pools.

Every entry point sets it once (streams/process.py for the worker and the trainer,
evaluation/comparison.py for an evaluation job), and every pool thread that runs model
work applies it to itself (`cap_this_thread` as the pool's initializer).
"""

from __future__ import annotations

_threads: int | None = None  # the cap `limit_threads` set, for `cap_this_thread`


def limit_threads(n: int) -> None:
    """Cap torch's and FAISS's thread pools (both OpenMP-based) at `n`: torch's for the
    whole process, FAISS's for this thread and every thread that calls `cap_this_thread`."""
    import torch

    global _threads
    _threads = n
    torch.set_num_threads(n)
    cap_this_thread()


def cap_this_thread() -> None:
    """Apply `limit_threads`' cap to FAISS in the calling thread (a pool's initializer).

    FAISS and its OpenBLAS run on their own copy of libgomp, whose thread count is a
    per-thread setting: a thread that has not set it runs at the machine's core count.
    The worker searches in the model-steps thread (streams/off_loop.py), so until each
    pool capped itself the cap reached only the main thread, which never searches. On this
    2-core machine, beside two busy processes, a 35-query search of 50,000 items took
    696 ms in an uncapped pool thread (`faiss.omp_get_max_threads()` 2 there), 10.4 ms in
    the same pool thread capped and 15.7 ms in the capped main thread (a scratch script)."""
    import faiss

    if _threads is not None:
        faiss.omp_set_num_threads(_threads)
