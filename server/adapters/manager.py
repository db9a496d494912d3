"""Which adapters exist, where they live, and who is using them.

Tiers: disk (registered, path known) -> host memory (the serving form, LRU under a byte limit) ->
device pool pages (LRU; an adapter is pinned while a running sequence uses it). Device residency
implies a host copy, so evicting from the device frees pages without copying anything back, and the
host limit (--adapter-host-memory) counts every adapter in memory, device-resident ones included.
To make room for a new adapter the host tier drops the least recently used adapters that no request
holds (their device pages first); an adapter that does not fit even then is refused (no_room) and
left unregistered. Requests hold a reference (acquire .. release) from admission to the end, so an
adapter a request waits for is never dropped; one dropped between its load and its request's
acquire is read again by acquire.

Threads: disk loads run in worker threads (`load`); the engine thread makes adapters resident and
pins them between steps (`make_resident`, `pin`, `unpin`); the prefetch thread (prefetch.py) copies the
adapters that queued requests wait for into device pages ahead of their admission (`prefetch`); admin
calls may come from anywhere. One lock guards the registry; disk I/O and prefetch copies happen outside it.
"""
from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from loader.adapters.adapter_paths import check_adapter_id, resolve_adapter_dir, resolve_adapter_path
from loader.adapters.adaption_prompt import AdaptionAdapter
from loader.adapters.chat_template import read_chat_template
from loader.adapters.ia3 import Ia3Adapter
from loader.adapters.lora import module_dims, read_adapter_config
from loader.adapters.prompt_adapter import PromptAdapter
from server.adapters.handle import AdapterHandle
from server.adapters.kinds import LORA, AdapterKind, kind_for
from server.adapters.layout import PackedAdapter, Resident, place
from server.adapters.pool import PagePool, PoolFullError, page_size_for
from server.errors import AdapterLoadError, AdapterNotFoundError

log = logging.getLogger("tessera.adapters")
_instances = itertools.count(1)


class AdapterObserver(Protocol):
    def adapter_loaded(self, source: str, seconds: float) -> None: ...
    def adapter_load_failed(self, reason: str) -> None: ...


@dataclass(eq=False)
class AdapterEntry:
    adapter_id: str
    path: Path
    kind: str
    rank: int
    nbytes: int
    family: AdapterKind = LORA  # what it needs and adds to a step (server/adapters/kinds.py), chosen at load
    # the serving form in host memory: LoRA packed in page order; prompt/IA3 adapters as loaded (IA3 on device)
    host: PackedAdapter | PromptAdapter | Ia3Adapter | AdaptionAdapter | None = None
    device: Resident | None = None
    pages: torch.Tensor | None = None
    pins: int = 0  # running sequences
    refs: int = 0  # queued + running requests
    unloading: bool = False
    chat_template: str | None = None  # the adapter's own (loader/adapters/chat_template.py); None = the base model's
    instance: int = 0  # which reading of its files is in memory: new at every load from disk (the KV cache's key)
    staging: bool = False  # the prefetch thread is copying it into device pages (not resident until done)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def wants_pages(self) -> bool:
        """In host memory, needs device pages, has none and is not being copied in (make_resident, prefetch)."""
        return self.host is not None and self.family.uses_pool and self.device is None and not self.staging

    @property
    def residency(self) -> str:
        return "device" if self.device is not None else ("host" if self.host is not None else "disk")


@dataclass
class _LoadJob:
    """One disk load in flight; concurrent loads of the same id wait for it and share its outcome."""
    done: threading.Event = field(default_factory=threading.Event)
    error: AdapterLoadError | None = None


def _size(nbytes: int, round_up: bool = False) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            v = nbytes / scale
            return f"{math.ceil(v * 10) / 10 if round_up else v:.1f} {unit}"
    return f"{nbytes} B"


class AdapterManager:
    def __init__(self, model, *, adapter_root: Path | None, device_memory: int, host_memory: int,
                 max_lora_rank: int, load_on_demand: bool = True, lora_dtype: torch.dtype | None = None,
                 shared: torch.Tensor | None = None, strip: int | None = None):
        """shared: the KV cache, whose strips of `strip` elements the pool shares (one memory budget,
        server/engine/memory.py); device_memory then bounds the pool's share instead of sizing it."""
        self.model = model
        self.cfg = model.config
        self.dtype, self.device = model.dtype, model.device
        self.root = Path(adapter_root) if adapter_root else None
        self.max_rank = max_lora_rank
        self.host_limit = host_memory
        self.load_on_demand = load_on_demand
        dims = module_dims(self.cfg)
        page = page_size_for([d for pair in dims.values() for d in pair])
        pool_dtype = lora_dtype or self.dtype  # LoRA pages; adapters load and pack in the model's dtype first
        elem = torch.empty(0, dtype=pool_dtype).element_size()
        if shared is None:
            self.pool = PagePool(max(1, device_memory // (page * elem)), page, pool_dtype, self.device)
        else:  # pages must tile the KV cache's strips
            page = math.gcd(page, strip)
            self.pool = PagePool(shared.numel() // page, page, pool_dtype, self.device, shared=shared,
                                 max_pages=device_memory // (page * elem))
        # one memory budget: pages short -> lend that many from idle KV blocks (engine thread) -> pages granted
        self.lend: Callable[[int], int] | None = None
        self.entries: dict[str, AdapterEntry] = {}
        self.observer: AdapterObserver | None = None
        self.num_evictions = 0
        self.num_prefetched = 0  # adapters copied into device pages ahead of their requests (prefetch)
        self._lock = threading.RLock()
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._loading: dict[str, _LoadJob] = {}
        self._retired: list[int] = []  # instances dropped from memory, for the engine to forget their KV
        # Set by the engine once the KV cache exists: num_virtual_tokens -> why a prompt-learning adapter's
        # shared prefix can never fit the cache's adapter share (None: it fits). Checked at load.
        self.prompt_kv_refusal: Callable[[int], str | None] | None = None
        max_bytes = self.pool.max_pages * page * elem
        log.info("adapter pool: %s%d pages of %d %s elements (%.1f MiB on %s), host tier %.1f MiB, max rank %d",
                 "up to " if shared is not None else "", self.pool.max_pages, page,
                 str(pool_dtype).removeprefix("torch."), max_bytes / 2**20, self.device, host_memory / 2**20,
                 max_lora_rank)
        if host_memory < max_bytes and shared is None:
            log.warning("--adapter-host-memory (%.1f MiB) is below the device pool (%.1f MiB): the host tier counts "
                        "device-resident adapters too, so the pool cannot fill", host_memory / 2**20,
                        max_bytes / 2**20)

    @property
    def lock(self) -> threading.RLock:
        """The registry's lock (the memory budget takes it to move pages between the pool and the KV cache)."""
        return self._lock

    # -- registry (any thread) -------------------------------------------------------------------
    def get(self, adapter_id: str) -> AdapterEntry | None:
        with self._lock:
            e = self.entries.get(adapter_id)
            return None if e is None or e.unloading else e

    def needs_load(self, adapter_id: str) -> bool:
        """True when a request for this id must first load it from disk (unknown, or evicted to disk)."""
        e = self.get(adapter_id)
        return e is None or e.host is None

    def needs_pages(self, adapter_id: str) -> bool:
        """In host memory, needs device pages, has none and is not being copied in."""
        e = self.get(adapter_id)
        return e is not None and e.wants_pages

    def load(self, adapter_id: str, path: Path | None = None, *, hold: bool = False) -> AdapterEntry:
        """Disk -> host tier (blocking: call from a worker thread). Explicit path = admin LoadAdapter.

        Every failure is an AdapterLoadError. hold: also take a request's reference (as acquire does) in the
        same critical section, so nothing can drop the adapter before the caller uses it; release() it."""
        check_adapter_id(adapter_id)
        if path is not None:
            path = resolve_adapter_path(path)
        while True:
            with self._lock:
                e = self.entries.get(adapter_id)
                if e is not None and e.unloading:
                    raise AdapterLoadError("not_found", f"adapter {adapter_id!r} is being unloaded; retry when it "
                                           "is gone")
                if e is not None and path is not None and path != e.path:
                    raise AdapterLoadError("invalid", f"adapter id {adapter_id!r} is already loaded from {e.path}; "
                                           "unload it first")
                if e is not None and e.host is not None:
                    if hold:
                        self._take(e)
                    return e
                job = self._loading.get(adapter_id)
                if job is None:
                    job = self._loading[adapter_id] = _LoadJob()
                    break
            job.done.wait()  # someone else is reading it: share their outcome
            if job.error is not None:
                err = AdapterLoadError(job.error.reason, str(job.error))
                err.retry_when_idle = job.error.retry_when_idle
                raise err
            # loaded: the next pass returns it (or reads it again if the host tier dropped it meanwhile)
        if path is None and e is not None:
            path = e.path  # registered, dropped to disk: read from where it was loaded
        try:
            return self._load_from_disk(adapter_id, path, hold)
        except AdapterLoadError as exc:
            job.error = exc
            if exc.retry_when_idle:  # not a failure yet: its request waits for room (AsyncEngine)
                log.info("adapter %s waits for host memory: %s", adapter_id, exc)
                raise
            if self.observer:
                self.observer.adapter_load_failed(exc.reason)
            log.warning("adapter %s failed to load: %s", adapter_id, exc)
            raise
        finally:
            with self._lock:
                self._loading.pop(adapter_id)
            job.done.set()

    def _load_from_disk(self, adapter_id: str, path: Path | None, hold: bool) -> AdapterEntry:
        t0 = time.perf_counter()
        try:
            path = path if path is not None else resolve_adapter_dir(self.root, adapter_id)
            family, adapter, host = self._read(adapter_id, path)
            chat_template = read_chat_template(path, adapter_id)
        except AdapterLoadError:
            raise
        except (MemoryError, torch.OutOfMemoryError) as exc:
            raise AdapterLoadError("no_room", f"adapter {adapter_id!r}: out of memory while reading it "
                                   f"({type(exc).__name__})") from exc
        except Exception as exc:  # a loader bug or a file no check foresaw: still a clear, typed refusal
            log.exception("adapter %s: unexpected error while reading %s", adapter_id, path)
            raise AdapterLoadError("invalid", f"adapter {adapter_id!r}: could not be read: "
                                   f"{type(exc).__name__}: {exc}") from exc
        nbytes = host.flat.numel() * host.flat.element_size() if family.uses_pool else adapter.nbytes
        with self._lock:
            e = self.entries.get(adapter_id)
            self._make_host_room(adapter_id, nbytes, e)
            if e is None:
                e = self.entries[adapter_id] = AdapterEntry(adapter_id, path, adapter.kind, 0, nbytes, family)
            # (re)read from disk: the files may have changed since it was registered
            e.kind, e.family, e.nbytes = adapter.kind, family, nbytes
            e.rank = adapter.rank if family.uses_pool else 0
            e.host, e.last_used, e.chat_template = host, time.monotonic(), chat_template
            e.instance = next(_instances)
            if hold:
                self._take(e)
        dt = time.perf_counter() - t0
        log.info("adapter %s loaded from %s: %s%s, %.2f MiB in %.0f ms", adapter_id, path, adapter.kind,
                 f" rank {adapter.rank}" if family.uses_pool else
                 f" {family.num_virtual_tokens(adapter)} virtual tokens" if family.num_virtual_tokens(adapter) else "",
                 adapter.nbytes / 2**20, dt * 1000)
        if self.observer:
            self.observer.adapter_loaded("disk", dt)
        return e

    def _read(self, adapter_id: str, path: Path):
        """Disk -> (its kind, the loaded adapter, its host serving form): the config's peft_type picks the kind,
        the kind reads it."""
        kind = kind_for(read_adapter_config(path).get("peft_type", ""))
        adapter, host = kind.read(self, adapter_id, path)
        return kind, adapter, host

    def unload(self, adapter_id: str) -> int:
        """Forget an adapter. Requests already using it finish first. -> how many are still running."""
        with self._lock:
            e = self.entries.get(adapter_id)
            if e is None or e.unloading:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} is not loaded")
            e.unloading = True
            if e.refs == 0:
                self._drop(e)
            log.info("adapter %s unloaded%s", adapter_id, f" after {e.refs} running requests" if e.refs else "")
            return e.refs

    def acquire(self, adapter_id: str, task: int = 0) -> AdapterHandle:
        """A request will use this adapter (counted until release). A registered adapter that the host tier
        dropped to disk (possibly right after its on-demand load) is read again here, blocking."""
        with self._lock:
            e = self.entries.get(adapter_id)
            if e is None or e.unloading:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} is not loaded")
            if e.host is not None:
                self._take(e)
                return AdapterHandle(e, task)
        return AdapterHandle(self.load(adapter_id, hold=True), task)

    def _take(self, e: AdapterEntry) -> None:
        e.refs += 1
        e.last_used = time.monotonic()

    def release(self, handle: AdapterHandle | str) -> None:
        """Give back a request's reference (a handle is released once, whatever number of calls)."""
        if isinstance(handle, AdapterHandle):
            if handle.released:
                return
            handle.released = True
            adapter_id = handle.adapter_id
        else:
            adapter_id = handle
        with self._lock:
            e = self.entries.get(adapter_id)
            if e is None:
                return
            e.refs -= 1
            if e.unloading and e.refs == 0:
                self._drop(e)

    def infos(self) -> list[dict]:
        with self._lock:
            return [dict(adapter_id=e.adapter_id, kind=e.kind, rank=e.rank, resident=e.residency, path=str(e.path),
                         bytes=e.nbytes, pins=e.pins, active_requests=e.refs)
                    for e in sorted(self.entries.values(), key=lambda e: e.adapter_id) if not e.unloading]

    def kind_counts(self) -> Counter:
        with self._lock:
            return Counter(e.kind for e in self.entries.values() if not e.unloading)

    def tier_counts(self) -> Counter:
        with self._lock:
            return Counter(e.residency for e in self.entries.values() if not e.unloading)

    # -- residency (engine thread) -----------------------------------------------------------------
    def make_resident(self, adapter: AdapterHandle | str) -> bool:
        """Put the adapter in device pages (evicting unpinned LRU ones). False if it cannot be now."""
        with self._lock:
            e = adapter.entry if isinstance(adapter, AdapterHandle) else self.entries.get(adapter)
            if e is None or e.host is None:
                return False
            e.last_used = time.monotonic()
            if e.device is not None or not e.family.uses_pool:  # the others need no pages
                return True
            if e.staging:  # the prefetch thread is copying it in: ready at a later step
                return False
            t0 = time.perf_counter()
            need = e.host.num_pages
            if not self._pool_room(need, keep=e, evict_held=True, lend=True):
                return False
            try:
                pages = self.pool.allocate(need)
            except PoolFullError:
                return False
            e.pages, e.device = pages, place(e.host, self.pool, pages, self.device)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            if self.observer:
                self.observer.adapter_loaded("host", time.perf_counter() - t0)
            return True

    def prefetch(self, e: AdapterEntry) -> bool:
        """Copy a host-resident LoRA adapter that queued requests wait for into device pages, ahead of their
        admission (the prefetch thread; the engine keeps stepping meanwhile). Room comes from free pages or from
        adapters no request holds: a prefetch never evicts what a queued or running request needs. The entry is
        `staging` during the copy (not resident: make_resident waits for it); if it is unloaded or dropped from
        memory meanwhile, its pages go back to the pool. -> True if it is resident now."""
        with self._lock:
            if not e.wants_pages or e.unloading or self.entries.get(e.adapter_id) is not e:
                return False
            need = e.host.num_pages
            if not self._pool_room(need, keep=e, evict_held=False):
                return False
            pages = self.pool.allocate(need)
            e.staging, e.pages, host = True, pages, e.host
        t0 = time.perf_counter()
        resident = None
        try:
            if self._copy_stream is not None:  # beside the engine's stream; done before anyone can use it
                with torch.cuda.stream(self._copy_stream):
                    resident = place(host, self.pool, pages, self.device)
                self._copy_stream.synchronize()
            else:
                resident = place(host, self.pool, pages, self.device)
        finally:
            with self._lock:
                e.staging = False
                if resident is None or e.host is not host or self.entries.get(e.adapter_id) is not e:
                    self.pool.free(pages)  # failed, or unloaded / dropped while it was copied
                    e.pages, resident = None, None
                else:
                    e.device = resident
                    self.num_prefetched += 1
        if resident is not None:
            log.debug("adapter %s prefetched into %d device pages in %.1f ms", e.adapter_id, need,
                      (time.perf_counter() - t0) * 1000)
        return resident is not None

    def pin(self, handle: AdapterHandle) -> None:
        """While its sequence runs: the device pages stay (an unpinned adapter may be evicted)."""
        with self._lock:
            if not handle.pinned:
                handle.entry.pins += 1
                handle.pinned = True

    def unpin(self, handle: AdapterHandle) -> None:
        with self._lock:
            if handle.pinned:
                handle.entry.pins -= 1
                handle.pinned = False

    def adapter(self, adapter_id: str) -> PromptAdapter | Ia3Adapter | AdaptionAdapter:
        """The loaded form of a prompt-learning, IA3 or adaption-prompt adapter (for inspection and tests)."""
        return self.entries[adapter_id].host

    # -- internals ---------------------------------------------------------------------------------
    def grow_pool(self, need: int) -> None:
        """Engine thread, one memory budget: lend idle KV blocks so `need` pages are free (for prefetches)."""
        with self._lock:
            if self.lend is not None and self.pool.num_free < need:
                self.lend(need - self.pool.num_free)

    def evict(self, e: AdapterEntry) -> None:
        """Device pages back to the pool (the memory budget reclaiming a block); the host copy stays."""
        with self._lock:
            if e.device is not None and e.pins == 0:
                self._evict(e)

    def _pool_room(self, need: int, keep: AdapterEntry, evict_held: bool, lend: bool = False) -> bool:
        """Free pages for `need`: with lend (the engine thread) first from idle KV blocks (one memory budget),
        then by evicting unpinned device-resident adapters other than `keep`: those no request waits for first,
        then the least recently used; evict_held False spares adapters queued requests hold (a prefetch never
        takes what a request needs). False if there is not enough room even then."""
        if lend and self.lend is not None and self.pool.num_free < need:
            self.lend(need - self.pool.num_free)
        if self.pool.num_free >= need:
            return True
        victims = sorted((v for v in self.entries.values() if v.device is not None and v.pins == 0 and v is not keep
                          and (evict_held or v.refs == 0)), key=lambda v: (v.refs > 0, v.last_used))
        for v in victims:  # one pass over the registry, however many evictions the room takes
            self._evict(v)
            if self.pool.num_free >= need:
                return True
        return False

    def _evict(self, e: AdapterEntry) -> None:
        self.pool.free(e.pages)
        e.pages, e.device = None, None
        self.num_evictions += 1
        log.debug("adapter %s evicted from the device pool (kept in host memory)", e.adapter_id)

    def take_retired(self) -> list[int]:
        """Instances dropped from memory since the last call (their cached KV is dead)."""
        with self._lock:
            out, self._retired = self._retired, []
            return out

    def _drop(self, e: AdapterEntry) -> None:
        if e.device is not None:
            self._evict(e)
        if e.host is not None:
            self._retired.append(e.instance)
        e.host = None
        self.entries.pop(e.adapter_id, None)

    def _make_host_room(self, adapter_id: str, nbytes: int, keep: AdapterEntry | None) -> None:
        """Room in the host tier for an adapter of nbytes (not yet counted): drop the host copies of the least
        recently used adapters no request holds, freeing their device pages first. Refuses (no_room) before
        dropping anything when even dropping all of them would not be enough."""
        others = [x for x in self.entries.values() if x.host is not None and x is not keep]
        used = sum(x.nbytes for x in others)
        idle = sorted((x for x in others if x.refs == 0 and x.pins == 0), key=lambda x: x.last_used)
        held = used - sum(x.nbytes for x in idle)  # by adapters that queued or running requests use
        if nbytes + held > self.host_limit:
            in_use = f" while adapters in use by requests hold {_size(held)}" if held else ""
            short = _size(nbytes + held - self.host_limit, round_up=True)
            err = AdapterLoadError("no_room", f"adapter {adapter_id!r} needs {_size(nbytes)} of host memory but "
                                   f"--adapter-host-memory is {_size(self.host_limit)}{in_use}: raise "
                                   f"--adapter-host-memory by at least {short}"
                                   + (" or retry when those requests finish" if held else ""))
            # it fits once those requests finish: a request for it may wait (AsyncEngine), not fail
            err.retry_when_idle = nbytes <= self.host_limit and held > 0
            raise err
        for x in idle:
            if used + nbytes <= self.host_limit:
                break
            if x.device is not None:
                self._evict(x)
            x.host = None
            self._retired.append(x.instance)
            used -= x.nbytes
            log.info("adapter %s dropped from host memory to make room for %s (reloads from %s)", x.adapter_id,
                     adapter_id, x.path)
