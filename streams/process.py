"""Process-wide set-up, in one place, called by the entry points (CLI commands, benchmarks)
and by nothing else: constructors never change global state.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable

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
    tune_allocator()


#: glibc's malloc maps every allocation from M_MMAP_THRESHOLD up afresh, and each page of a
#: fresh mapping faults (is zeroed by the kernel) when first written. A trainer step's and a
#: serving batch's tensors of 1 to 30 MB (the sampled softmax's 2,048 rows of T, attention's
#: activations, the search's score chunks) then cost ~47,000 page faults per 500-event batch
#: of `bench.compute --items 50000` at a 1 MB threshold, ~1,700 at 32 MB (where glibc's own
#: adaptive threshold stops rising), as the heap's freed blocks serve the next batch (README,
#: Performance). The heap keeps a free top of up to TRIM_THRESHOLD (glibc's adaptive pair:
#: twice the mmap threshold) between trims.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20
#: How often (s) the free memory of every heap goes back to the OS (`malloc_trim`): the
#: bound on memory that the high thresholds would otherwise keep. One call took ~4 ms and
#: returned ~100 MB of bench.compute's heap (a worker's and a trainer's parts in one
#: process); the next batch then faulted ~15,000 pages back in.
TRIM_EVERY_S = 30.0
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from malloc.h
_trimmer: threading.Thread | None = None


def tune_allocator(trim_every_s: float = TRIM_EVERY_S) -> None:
    """glibc only: large blocks come from the heap (`MMAP_THRESHOLD`), and a daemon thread
    gives the heaps' free pages back every `trim_every_s` (`malloc_trim(0)`, which also
    frees whole pages inside the heap). The periodic trim is what keeps RSS flat: with
    glibc's own dynamic thresholds (which rise to these), transient copies of several MB
    (snapshots, co-visitation counts) left the heap fragmented, and in bench/soak.py RSS
    rose in steps at every checkpoint. Started once per process."""
    global _trimmer
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to tune
        log.debug("mallopt not available; allocator left as is")
        return
    if not ok:
        log.warning("glibc refused a malloc threshold (mallopt); large blocks may be mapped")
    if _trimmer is None:
        _trimmer = threading.Thread(target=_trim_every, args=(trim, trim_every_s),
                                    name="allocator-trim", daemon=True)
        _trimmer.start()


def _trim_every(trim: Callable[[int], int], seconds: float) -> None:
    """The trimming thread's loop (ctypes releases the GIL for the call)."""
    while True:
        time.sleep(seconds)
        trim(0)


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
