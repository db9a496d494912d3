"""Prefetch: the adapters that queued requests wait for go into device pages while the batch runs.

After each schedule the engine names the LoRA adapters of the first waiting requests that are in host
memory but not in the device pool (`want`, in queue order). One thread of its own copies them in
(manager.prefetch: free pages, or pages of adapters no request holds), so that when those requests'
turn comes, admission finds their adapter resident and the engine thread copies nothing. The disk tier
needs no prefetch here: a request is queued only once its adapter is in host memory, and that read
runs in a worker thread (AsyncEngine._admit), never in a step.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict

log = logging.getLogger("tessera.adapters")


class Prefetcher:
    def __init__(self, manager, depth: int):
        self.manager = manager
        self.depth = depth  # waiting requests looked at per step
        self._wanted: OrderedDict[int, object] = OrderedDict()  # id(entry) -> entry, in queue order
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False  # a copy is in flight
        self._thread: threading.Thread | None = None

    def want(self, waiting) -> None:
        """The engine thread, after scheduling: `waiting` sequences in queue order; their non-resident LoRA
        adapters replace what was wanted before (the queue changed)."""
        wanted: OrderedDict[int, object] = OrderedDict()
        for seq in waiting:
            if len(wanted) >= self.depth:
                break
            h = seq.adapter
            if h is not None and h.entry.wants_pages:
                wanted[id(h.entry)] = h.entry
        if wanted:  # one memory budget: idle KV blocks become pool pages for them first
            self.manager.grow_pool(sum(host.num_pages for e in wanted.values() if (host := e.host) is not None))
        with self._cond:
            if not wanted and not self._wanted:
                return
            self._wanted = wanted
            if wanted and self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="tessera-prefetch", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Until nothing is wanted and no copy is in flight (tests and benchmarks; the engine never waits)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._wanted and not self._busy, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._wanted.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._wanted and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                _, entry = self._wanted.popitem(last=False)
                self._busy = True
            try:
                self.manager.prefetch(entry)
            except Exception:  # a failed copy leaves the adapter on the host: admission copies it then
                log.exception("prefetching adapter %s failed", entry.adapter_id)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
