"""Weight-only quantized formats, their reference dequantization, and round-to-nearest quantizers.

int4 (group-wise, asymmetric):  w[n, k] = q[n, k] * scale[n, k // G] + min[n, k // G],  q in 0..15
int8 (group-wise, symmetric):   w[n, k] = q[n, k] * scale[n, k // G],                   q in -128..127
                                (per output channel: G = in_features)
Scales and mins are fp16 (GGUF stores them so: Q4_0/Q4_1/Q8_0 convert without loss). K must be a
multiple of 32; when it is not a multiple of G the last group is shorter (SmolLM2's hidden size 576
with G = 128: four groups of 128 and one of 64).
int4 values are packed two per byte in blocks of 32 along k, GGML's order: byte j of a block holds
q[j] in its low nibble and q[j + 16] in its high nibble.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """A [out_features, in_features] weight in int4 or int8 form."""
    bits: int  # 4 or 8
    qweight: torch.Tensor  # int4: uint8 [N, K/2] (packed); int8: int8 [N, K]
    scales: torch.Tensor  # fp16 [N, K/G]
    mins: torch.Tensor | None  # fp16 [N, K/G] for int4, None for int8
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        n = self.qweight.shape[0]
        return n, self.qweight.shape[1] * (2 if self.bits == 4 else 1)

    @property
    def num_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.mins) if t is not None)

    def to(self, device: torch.device) -> "QuantizedWeight":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(self.bits, mv(self.qweight), mv(self.scales), mv(self.mins), self.group_size)

    def rows(self, start: int, end: int) -> "QuantizedWeight":
        sl = lambda t: None if t is None else t[start:end]  # noqa: E731
        return QuantizedWeight(self.bits, sl(self.qweight), sl(self.scales), sl(self.mins), self.group_size)

    @staticmethod
    def cat(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Stack along the output dimension (fused q/k/v, gate/up)."""
        p0 = parts[0]
        if any((p.bits, p.group_size, p.qweight.shape[1]) != (p0.bits, p0.group_size, p0.qweight.shape[1])
               for p in parts):
            raise ValueError("cannot fuse quantized slices with different formats")
        return QuantizedWeight(p0.bits, torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                               None if p0.mins is None else torch.cat([p.mins for p in parts]), p0.group_size)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] in GGML block order -> uint8 [N, K] values 0..15."""
    n = packed.shape[0]
    blocks = packed.view(n, -1, 16)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).reshape(n, -1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values 0..15 -> uint8 [N, K/2] in GGML block order (K a multiple of 32)."""
    n = q.shape[0]
    blocks = q.to(torch.uint8).view(n, -1, 32)
    return (blocks[..., :16] | (blocks[..., 16:] << 4)).reshape(n, -1).contiguous()


def _per_column(t: torch.Tensor, g: int, k: int) -> torch.Tensor:
    """[N, ceil(K/G)] group values -> [N, K], each repeated over its group's columns."""
    return t.float().repeat_interleave(g, dim=1)[:, :k]


def _group_stats(w: torch.Tensor, g: int, fn) -> torch.Tensor:
    """fn(values [N, groups, size]) -> [N, groups] over groups of g columns (the last may be shorter)."""
    n, k = w.shape
    full = k // g * g
    parts = [fn(w[:, :full].reshape(n, k // g, g))] if full else []
    if full < k:
        parts.append(fn(w[:, full:].reshape(n, 1, k - full)))
    return torch.cat(parts, dim=1)


def ref_dequantize(w: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Semantics: the [N, K] weight the format encodes (module docstring), computed in fp32."""
    n, k = w.shape
    g = w.group_size
    if w.bits == 4:
        out = unpack_int4(w.qweight).float() * _per_column(w.scales, g, k) + _per_column(w.mins, g, k)
    else:
        out = w.qweight.float() * _per_column(w.scales, g, k)
    return out.to(dtype)


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> QuantizedWeight:
    """Round-to-nearest asymmetric int4 per group of `group_size` input columns."""
    n, k = w.shape
    if k % 32 or group_size % 32 or group_size < 32:
        raise ValueError(f"int4 needs in_features ({k}) and the group size ({group_size}) to be multiples of 32")
    w = w.float()
    lo, hi = _group_stats(w, group_size, lambda t: t.amin(-1)), _group_stats(w, group_size, lambda t: t.amax(-1))
    scales = ((hi - lo) / 15).to(torch.float16)
    mins = lo.to(torch.float16)
    s = _per_column(scales, group_size, k).clamp_min(1e-10)
    q = torch.round((w - _per_column(mins, group_size, k)) / s).clamp_(0, 15).to(torch.uint8)
    return QuantizedWeight(4, pack_int4(q), scales, mins, group_size)


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    """Round-to-nearest symmetric int8, per output channel (group_size None) or per group."""
    n, k = w.shape
    g = group_size or k
    if k % 32 or g % 32:
        raise ValueError(f"int8 needs in_features ({k}) and the group size ({g}) to be multiples of 32")
    w = w.float()
    scales = (_group_stats(w, g, lambda t: t.abs().amax(-1)) / 127).to(torch.float16)
    q = torch.round(w / _per_column(scales, g, k).clamp_min(1e-10)).clamp_(-128, 127).to(torch.int8)
    return QuantizedWeight(8, q, scales, None, g)


def from_ggml_blocks(raw: torch.Tensor, kind: str, k: int) -> QuantizedWeight:
    """GGUF Q4_0 / Q4_1 / Q8_0 blocks (uint8 [N, bytes]) -> the same values, no rounding.

    Q4_0: d, 16 nibble bytes: w = d * (q - 8)  -> int4 scale d, min -8d (exact in fp16: a power-of-two multiple)
    Q4_1: d, m, 16 nibble bytes: w = d * q + m -> int4 scale d, min m
    Q8_0: d, 32 int8: w = d * q                -> int8 group 32, scale d
    """
    n = raw.shape[0]
    nb = k // 32
    if kind == "Q8_0":
        b = raw.view(n, nb, 34)
        d = b[..., :2].contiguous().view(torch.float16).view(n, nb)
        q = b[..., 2:].contiguous().view(torch.int8).reshape(n, k)
        return QuantizedWeight(8, q, d, None, 32)
    if kind == "Q4_0":
        b = raw.view(n, nb, 18)
        d = b[..., :2].contiguous().view(torch.float16).view(n, nb)
        qs = b[..., 2:].reshape(n, k // 2).contiguous()
        return QuantizedWeight(4, qs, d, (d.float() * -8).to(torch.float16), 32)
    if kind == "Q4_1":
        b = raw.view(n, nb, 20)
        d = b[..., :2].contiguous().view(torch.float16).view(n, nb)
        m = b[..., 2:4].contiguous().view(torch.float16).view(n, nb)
        qs = b[..., 4:].reshape(n, k // 2).contiguous()
        return QuantizedWeight(4, qs, d, m, 32)
    raise ValueError(f"GGML type {kind} has no packed form here")
