"""How one adapter sits in pool pages: packed once at load, viewed every step.

The host copy of an adapter is one flat buffer in page order. For each fused linear layer of the
model (q/k/v, o, gate/up, down) it holds the A rows of every adapted slice back to back, then each
slice's Bt rows (already multiplied by the scale; DoRA's g folded in by the loader), so that
    h = x @ A_cat.T          one shrink for all slices of the fused layer   [n, sum r]
    y[:, slice] += h[:, r0:r1] @ Bt_slice                                    one expand per slice
Making an adapter resident is then one copy of that buffer into its pages.
The layout itself is one int32 row per fused layer (kernels/lora.py: DESC_FIELDS), offsets in the
adapter's virtual pages, which the kernels read through its page table. That tensor is all an adapter
keeps of its layout: the per-slice view (`groups`: GroupLayout / ResidentGroup) is derived from it and
the model's Linear shapes on demand, for the torch path and DoRA only. A thousand adapters in host
memory are then a few thousand objects for the garbage collector, not a few hundred thousand (a full
collection walks every tracked object while holding the GIL the engine thread needs).
"""
from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass

import torch

from kernels.lora import DESC_FIELDS
from loader.adapters.lora import _PARENT, LoraAdapter
from server.adapters.pool import PagePool
from server.errors import AdapterLoadError


@dataclass(frozen=True)
class LinearShape:
    """One fused Linear of the model, as the layout needs it (shared by every adapter)."""
    layer: int
    slice_names: tuple[str, ...]
    slice_cols: tuple[tuple[int, int], ...]  # output columns of each slice in the fused layer
    in_features: int


_SHAPES: "weakref.WeakKeyDictionary[object, tuple[LinearShape, ...]]" = weakref.WeakKeyDictionary()


def linear_shapes(model) -> tuple[LinearShape, ...]:
    """The model's fused Linears in kernel-key order (`Linear.key`), computed once per model."""
    shapes = _SHAPES.get(model)
    if shapes is None:
        lins = sorted(model.linears(), key=lambda lin: lin.key)
        shapes = tuple(LinearShape(lin.layer_idx, tuple(lin.slice_names),
                                   tuple(tuple(lin.slice_offsets[n]) for n in lin.slice_names), lin.in_features)
                       for lin in lins)
        _SHAPES[model] = shapes
    return shapes


@dataclass
class SliceLayout:
    name: str  # HF module name, e.g. "k_proj"
    cols: tuple[int, int]  # output columns of the fused layer
    r0: int  # rows of A_cat (columns of h) that belong to this slice
    r1: int
    bt_pages: tuple[int, int]  # [start, end) page offsets in the adapter's buffer
    out_features: int
    dora_g: torch.Tensor | None


@dataclass
class GroupLayout:
    """The adapted slices of one fused Linear."""
    a_pages: tuple[int, int]
    in_features: int
    rank: int  # sum of the slices' ranks
    slices: list[SliceLayout]


def layout_groups(desc: torch.Tensor, shapes: tuple[LinearShape, ...], page_size: int,
                  dora_g: dict[tuple[int, str], torch.Tensor] | None) -> dict[tuple[int, str], GroupLayout]:
    """(layer, first slice name of the fused Linear) -> the layout of its adapted slices, read off `desc`."""
    groups = {}
    for key, row in enumerate(desc.tolist()):
        if row[1] <= 0:
            continue
        shape = shapes[key]
        slices = []
        for j, name in enumerate(shape.slice_names):
            bt0, r0, r1 = row[2 + 3 * j:5 + 3 * j]
            if r1 <= r0:
                continue
            c0, c1 = shape.slice_cols[j]
            slices.append(SliceLayout(name, (c0, c1), r0, r1, (bt0, bt0 + (r1 - r0) * (c1 - c0) // page_size), c1 - c0,
                                      None if dora_g is None else dora_g.get((shape.layer, name))))
        groups[(shape.layer, shape.slice_names[0])] = GroupLayout(
            (row[0], row[0] + row[1] * shape.in_features // page_size), shape.in_features, row[1], slices)
    return groups


@dataclass(eq=False)
class PackedAdapter:
    flat: torch.Tensor  # [num_pages * page_size], host memory
    num_pages: int
    desc: torch.Tensor  # int32 [num Linears, DESC_FIELDS]: the layout (offsets in the adapter's own pages)
    max_rank: int  # the largest sum of ranks over fused layers (width of the kernels' h)
    shapes: tuple[LinearShape, ...]  # the model's (shared)
    page_size: int
    dora_g: dict[tuple[int, str], torch.Tensor] | None = None  # (layer, slice name) -> DoRA's g, if any

    @property
    def groups(self) -> dict[tuple[int, str], GroupLayout]:
        return layout_groups(self.desc, self.shapes, self.page_size, self.dora_g)


def pack(adapter: LoraAdapter, model, page_size: int, pin: bool, dtype: torch.dtype | None = None) -> PackedAdapter:
    """Lay the adapter out in page order (A_cat then Bt per fused layer) in one host buffer of `dtype` (the
    pool's; default: the adapter's), written once: each tensor read from its file is copied straight into its
    place, converted on the way. The scale is folded into Bt in fp32 (or in the buffer's dtype when that is
    exact) and rounded once. One finiteness check over the whole buffer (NaN, infinity, or an overflow of the
    buffer's dtype) names the first bad module."""
    copies: list[tuple[int, torch.Tensor, float | None]] = []  # (element offset, source [rows, width], scale)
    at, max_rank, dora_g = 0, 0, {}
    by_linear: dict[tuple[int, str], list[str]] = {}
    desc = torch.zeros(len(model.linears()), DESC_FIELDS, dtype=torch.int32)
    for layer, mod in sorted(adapter.modules):
        lin = model.linear(layer, mod)
        by_linear.setdefault((layer, lin.slice_names[0]), []).append(mod)
    for (layer, first), mods in sorted(by_linear.items()):
        lin = model.linear(layer, first)
        mods = [m for m in lin.slice_names if m in mods]  # the fused order
        ms = [adapter.modules[(layer, m)] for m in mods]
        a_start, rows = at, 0
        for m in ms:  # A_cat [sum r, in]: the slices' A rows back to back
            copies.append((at * page_size, m.A, None))
            at += _pages(m.A, page_size)
            rows += m.rank
        d = desc[lin.key]
        d[0], d[1] = a_start, rows
        r = 0
        for name, m in zip(mods, ms):
            copies.append((at * page_size, m.Bt, m.scale))
            j = 2 + 3 * lin.slice_names.index(name)
            d[j], d[j + 1], d[j + 2] = at, r, r + m.rank
            if m.dora_g is not None:
                dora_g[(layer, name)] = m.dora_g
            at += _pages(m.Bt, page_size)
            r += m.rank
        max_rank = max(max_rank, rows)
    if dtype is None:
        dtype = copies[0][1].dtype if copies else torch.float32
    flat = torch.empty(at * page_size, dtype=dtype, pin_memory=pin)
    for off, src, scale in copies:
        dst = flat[off:off + src.numel()].view(src.shape)
        if scale is None:
            dst.copy_(src)
        elif dtype == torch.float32 or math.frexp(scale)[0] == 0.5:  # exact in dst (a power of two), or fp32 anyway
            dst.copy_(src).mul_(scale)
        else:
            dst.copy_(src.float() * scale)
    _check_finite(adapter, flat)
    return PackedAdapter(flat, at, desc, max_rank, linear_shapes(model), page_size, dora_g or None)


def _pages(t: torch.Tensor, page_size: int) -> int:
    assert t.numel() % page_size == 0, "row widths must be multiples of the page size"
    return t.numel() // page_size


def _check_finite(adapter: LoraAdapter, flat: torch.Tensor) -> None:
    """One pass (a sum: NaN and infinity propagate); only a non-finite sum looks closer, to name the module."""
    if flat.numel() == 0 or torch.isfinite(flat.sum(dtype=torch.float32)) or torch.isfinite(flat).all():
        return
    name = adapter.path.name if adapter.path else adapter.adapter_id
    for (layer, mod), m in sorted(adapter.modules.items()):
        if not (torch.isfinite(m.A).all() and torch.isfinite(m.Bt).all()):
            raise AdapterLoadError("invalid", f"{name}: model.layers.{layer}.{_PARENT[mod]}.{mod} has NaN or infinite weights")
    raise AdapterLoadError("invalid", f"{name}: weights overflow {str(flat.dtype).removeprefix('torch.')} "
                           "(the adapter pool's --lora-dtype)")


@dataclass
class ResidentSlice:
    name: str
    cols: tuple[int, int]
    r0: int
    r1: int
    bt_pages: torch.Tensor  # page ids in the pool
    Bt: torch.Tensor | None  # [r, out] view into the pool when its pages are consecutive
    out_features: int
    dora_g: torch.Tensor | None


@dataclass
class ResidentGroup:
    a_pages: torch.Tensor
    A: torch.Tensor | None  # [sum r, in] view into the pool when consecutive
    in_features: int
    rank: int
    slices: list[ResidentSlice]


@dataclass(eq=False)
class Resident:
    """An adapter in device pages: page table + descriptors for the kernels (all a step reads), and the
    per-slice pool views for the torch path, built on first use."""
    page_table: torch.Tensor  # int32 [num_pages] on the device: virtual page -> pool page
    desc: torch.Tensor  # int32 [num Linears, DESC_FIELDS] on the device
    adapted: frozenset[int]  # keys of the Linears this adapter targets
    packed: PackedAdapter  # its host form: the layout the views follow
    buffer: torch.Tensor  # the pool's [pages, page_size] buffer

    @property
    def max_rank(self) -> int:
        return self.packed.max_rank

    @property
    def has_dora(self) -> bool:
        return self.packed.dora_g is not None

    @functools.cached_property
    def groups(self) -> dict[tuple[int, str], ResidentGroup]:
        """(layer, first slice name) -> the pool views and page ids of its slices (torch path, DoRA)."""
        return resident_groups(self.packed, self.buffer, self.page_table)


def resident_groups(packed: PackedAdapter, buf: torch.Tensor, page_table: torch.Tensor) -> dict[tuple[int, str], ResidentGroup]:
    ids = page_table.tolist()  # ascending (the allocator's order): a span is consecutive iff its ends are
    dev_pages = page_table.long()
    device = page_table.device

    def view(span: tuple[int, int], rows: int, width: int) -> torch.Tensor | None:
        first, last = ids[span[0]], ids[span[1] - 1]
        return buf[first:last + 1].view(rows, width) if last - first == span[1] - span[0] - 1 else None

    out = {}
    for key, g in packed.groups.items():
        slices = [ResidentSlice(s.name, s.cols, s.r0, s.r1, dev_pages[s.bt_pages[0]:s.bt_pages[1]],
                                view(s.bt_pages, s.r1 - s.r0, s.out_features), s.out_features,
                                None if s.dora_g is None else s.dora_g.to(device))
                  for s in g.slices]
        out[key] = ResidentGroup(dev_pages[g.a_pages[0]:g.a_pages[1]], view(g.a_pages, g.rank, g.in_features),
                                 g.in_features, g.rank, slices)
    return out


def place(packed: PackedAdapter, pool: PagePool, pages: torch.Tensor, device: torch.device) -> Resident:
    """Copy the packed buffer into `pages` of the pool; the kernels' metadata (page table, descriptors)."""
    pool.write(pages, packed.flat)
    pages = pool.physical(pages)  # the buffer rows the kernels and views read
    adapted = frozenset(torch.nonzero(packed.desc[:, 1]).flatten().tolist())
    return Resident(pages.to(device=device, dtype=torch.int32), packed.desc.to(device), adapted, packed, pool.buffer)
