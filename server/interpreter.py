"""The garbage collector of a serving process: what startup built is frozen out of its reach.

The model, tokenizer, kernels, grammar compiler and gRPC/HTTP stacks leave ~270k long-lived Python
objects behind. Left in the collector's oldest generation, every full collection walks them all while
holding the GIL (0.13-0.2 s measured on this 2-core CPU), and the engine thread waits for the GIL
meanwhile. Freezing the startup heap (gc.freeze, as vLLM does after its start) moves them to a permanent
generation that collections never visit; what requests allocate afterwards is collected as usual. On the
saturated base-only benchmark it made no difference beyond this machine's noise (interleaved A/B, 3 pairs);
it bounds the pauses. A collection that still takes longer than SLOW_COLLECTION_S is logged at WARNING:
a thousand adapters in host memory keep ~250 tracked layout objects each, and a full collection over
them took 0.45 s here.
"""
from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("tessera.gc")

SLOW_COLLECTION_S = 0.05  # a collection longer than this is logged: it held the GIL that long
_collection_start: float | None = None


def _time_collections(phase: str, info: dict) -> None:
    global _collection_start
    if phase == "start":
        _collection_start = time.perf_counter()
    elif _collection_start is not None:
        took = time.perf_counter() - _collection_start
        if took > SLOW_COLLECTION_S:
            log.warning("garbage collection of generation %d took %.0f ms (%d objects collected); the engine "
                        "thread waited for the GIL meanwhile", info.get("generation", -1), took * 1e3,
                        info.get("collected", 0))


def freeze_startup_heap() -> int:
    """Collect once, then freeze every surviving object; returns how many were frozen."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    if _time_collections not in gc.callbacks:
        gc.callbacks.append(_time_collections)
    log.info("froze %d startup objects out of the garbage collector's reach (%.0f ms)", frozen,
             (time.perf_counter() - t0) * 1e3)
    return frozen
