"""Process-wide set-up, in one place, called by the entry points (CLI commands, benchmarks)
and by nothing else: constructors never change global state.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys

from models.compute_threads import limit_threads

log = logging.getLogger("streamrec.process")

#: How long (s) a thread that wants the GIL waits before the holder is asked to let it go
#: (CPython's default: 5 ms). The model-steps thread's torch and FAISS calls give the GIL up
#: and take it back around each op, and while the event loop runs Python (Faust's fetching
#: and dispatch) each take could wait up to that long. Under a backlog at 50,000 items the
#: text encoder's stage took 55.9 ms per 500-event batch at 5 ms and 29.7 ms at 0.5 ms
#: (`bench.throughput --events 60000 --users 30000 --items 50000 --skip-raw`; README,
#: Performance, which also has p99 at half the load: 655 ms at 5 ms, 571 at 0.5). One run each.
#: It also makes a switch in the middle of a loop-side read of what a step changes likelier
#: (one crashed a worker): such reads run as model steps (streams/off_loop.py).
GIL_SWITCH_INTERVAL_S = 0.0005


def configure_process(compute_threads: int, blas_threshold: int, search_threads: int = 1
                      ) -> None:
    """Thread pools (the search's: index.topk.use_threads), the GIL's switch interval,
    FAISS's switch to BLAS (index.faiss_index.use_blas_from) and the allocator, for a
    long-running worker or trainer."""
    from index.faiss_index import use_blas_from
    from index.topk import use_threads

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    limit_threads(compute_threads)
    use_threads(search_threads)
    use_blas_from(blas_threshold)
    return_large_allocations()


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
