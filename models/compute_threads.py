"""The cap on the learner's compute threads: torch's and FAISS's OpenMP pools, and numpy's
BLAS (index/topk.py's GEMM).

Every entry point sets it once (streams/process.py for the worker and the trainer,
evaluation/comparison.py for an evaluation job), and every pool thread that runs model
work applies it to itself (`cap_this_thread` as the pool's initializer).
"""

from __future__ import annotations

from threadpoolctl import threadpool_limits

_threads: int | None = None  # the cap `limit_threads` set, for `cap_this_thread`


def limit_threads(n: int) -> None:
    """Cap torch's and FAISS's thread pools (both OpenMP-based) at `n` in this thread and in
    every thread that calls `cap_this_thread`, and numpy's BLAS (one pool per process,
    OpenBLAS's pthreads) at `n`."""
    global _threads
    _threads = n
    threadpool_limits(n, user_api="blas")
    cap_this_thread()


def cap_this_thread() -> None:
    """Apply `limit_threads`' cap to FAISS and torch in the calling thread (a pool's
    initializer).

    OpenMP keeps the thread count per thread: a thread that has not set it runs at the
    machine's core count. FAISS runs on its own copy of libgomp, and so do torch's matmuls
    (MKL on torch's libgomp), whatever `torch.get_num_threads()` answers there. The worker
    searches and steps in the model-steps thread (streams/off_loop.py), so until each pool
    capped itself the cap reached only the main thread, which does neither:
    - FAISS: on this 2-core machine, beside two busy processes, a 35-query search of 50,000
      items took 696 ms in an uncapped pool thread, 10.4 ms in the same pool thread capped
      and 15.7 ms in the capped main thread (a scratch script);
    - torch: with the worker's imports, a 2000 x 2000 matmul in the model-steps thread ran
      on two threads (0.113 s wall, 0.217 s CPU) after `limit_threads(1)`, on one once
      capped here (0.203 s, 0.203 s). The worker imports faiss before torch, so each
      binds its own libgomp; the other way round, faiss's `omp_set_num_threads` binds to
      torch's (loaded globally) and capped both, which hid this in a bare script."""
    import faiss
    import torch

    if _threads is not None:
        faiss.omp_set_num_threads(_threads)
        torch.set_num_threads(_threads)
