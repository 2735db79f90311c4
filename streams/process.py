"""Process-wide set-up, in one place, called by the entry points (CLI commands, benchmarks)
and by nothing else: constructors never change global state.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger("streamrec.process")


def configure_process(compute_threads: int, blas_threshold: int) -> None:
    """Thread pools, FAISS's switch to BLAS (index.faiss_index.use_blas_from) and the
    allocator, for a long-running worker or trainer."""
    from index.faiss_index import use_blas_from

    limit_threads(compute_threads)
    use_blas_from(blas_threshold)
    return_large_allocations()


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
    2-core machine a 35-query search of 50,000 items took 15.7 ms capped and 696 ms
    uncapped beside two busy processes (a scratch script, `faiss.omp_get_max_threads()`
    2 in a pool thread)."""
    import faiss

    if _threads is not None:
        faiss.omp_set_num_threads(_threads)


def return_large_allocations(threshold: int = 1 << 20) -> None:
    """glibc only: serve allocations >= `threshold` bytes by mmap, so freeing them gives the
    memory back to the OS. By default glibc raises this threshold to the largest block freed
    so far (up to 32 MB), after which transient copies of several MB (snapshots, co-visitation
    counts) come from the heap and leave it fragmented: in bench/soak.py RSS rose in steps
    at every checkpoint."""
    m_mmap_threshold = -3  # from malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(m_mmap_threshold, threshold)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        log.debug("mallopt not available; allocator left as is")


def freeze_heap(young_only: bool = False) -> None:
    """Exclude every object alive now from Python's cyclic GC (`gc.freeze`), collecting first
    so that only live ones are kept. A full collection over the loaded encoder, tokenizer and
    Faust (~0.5 M objects) takes ~0.3 s and showed as the p99 of event -> recommendation
    latency; at start-up's end (1M items) a py-spy trace put ~0.29 s in it. So the
    worker's entry point takes the full one before its event loop runs, and the start-up's
    end collects only the young generations (`young_only`: it does not scan the old or
    frozen objects) before freezing what start-up built. What is created later is collected
    as usual."""
    gc.collect(1 if young_only else 2)
    gc.freeze()
