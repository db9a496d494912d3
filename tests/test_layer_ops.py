"""The C++ RMSNorm, rotary embedding and SwiGLU (kernels/cpu/layer_ops.cpp) against their torch references
on fresh random inputs: rotary and SwiGLU exactly (the same roundings, no fused multiply-add, torch's own
exp), RMSNorm within a few ulp (its sum of squares is accumulated in another order); on strided views of
fused outputs, and the torch path wherever autograd needs it."""
from __future__ import annotations

import pytest
import torch

from kernels import layer_ops

pytestmark = [pytest.mark.skipif(layer_ops._ext() is None, reason="the C++ CPU kernels are not built (run ./setup.sh)"),
              pytest.mark.usefixtures("cpu_threads")]  # one thread, and the work split over two


@pytest.mark.parametrize("T,D", [(1, 576), (7, 64), (33, 40), (130, 576)])
def test_rms_norm_equals_hf_order(T, D):
    g = torch.Generator().manual_seed(T * D)
    x, w = torch.randn(T, D, generator=g) * 3, torch.randn(D, generator=g)
    got = layer_ops.rms_norm(x, w, 1e-5)
    want = layer_ops.ref_rms_norm(x.double(), w.double(), 1e-5)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-6)
    assert (got - layer_ops.ref_rms_norm(x, w, 1e-5)).abs().max() <= 4e-6 * want.abs().max()
    strided = torch.randn(T, 2 * D, generator=g)[:, :D]  # rows of a wider tensor
    torch.testing.assert_close(layer_ops.rms_norm(strided, w, 1e-5), layer_ops.ref_rms_norm(strided, w, 1e-5))


@pytest.mark.parametrize("T,H,KVH,Dh", [(1, 9, 3, 64), (5, 4, 2, 24), (70, 9, 3, 64), (3, 2, 2, 8)])
def test_rotary_in_place_equals_torch_exactly(T, H, KVH, Dh):
    g = torch.Generator().manual_seed(T + H + Dh)
    qkv = torch.randn(T, (H + 2 * KVH) * Dh, generator=g)
    q = qkv[:, :H * Dh].view(T, H, Dh)
    k = qkv[:, H * Dh:(H + KVH) * Dh].view(T, KVH, Dh)
    ang = torch.rand(T, 1, Dh // 2, generator=g) * 50
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    want_q, want_k = layer_ops.ref_rotary(q.clone(), k.clone(), cos, sin)
    v_before = qkv[:, (H + KVH) * Dh:].clone()
    got_q, got_k = layer_ops.rotary(q, k, cos, sin)
    assert got_q.data_ptr() == q.data_ptr()  # in place, in the fused output
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(qkv[:, (H + KVH) * Dh:], v_before), "v must be untouched"


@pytest.mark.parametrize("T,I", [(1, 1536), (9, 32), (33, 96), (512, 64), (5, 48)])
def test_silu_and_mul_equals_torch_exactly(T, I):
    """I = 48 takes the torch path (torch's own tail handling); the others the C++ kernel."""
    if not layer_ops._silu_mul_ok():
        pytest.skip("no AVX-512 or no exported SLEEF exp: the torch expression runs instead")
    g = torch.Generator().manual_seed(T + I)
    x = torch.randn(T, 2 * I, generator=g) * 8
    x[0, :8] = torch.tensor([-200.0, -88.0, 0.0, 89.0, float("inf"), float("-inf"), float("nan"), -0.0])
    got, want = layer_ops.silu_and_mul(x), layer_ops.ref_silu_and_mul(x)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    strided = torch.randn(T, 4 * I, generator=g)[:, :2 * I]  # rows of a wider tensor
    assert torch.equal(layer_ops.silu_and_mul(strided), layer_ops.ref_silu_and_mul(strided))


def test_autograd_takes_the_torch_path():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=g, requires_grad=True)
    w = torch.randn(32, generator=g)
    layer_ops.rms_norm(x, w, 1e-6).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    q = torch.randn(4, 2, 16, generator=g, requires_grad=True)
    k = torch.randn(4, 1, 16, generator=g)
    cos, sin = torch.rand(4, 1, 16, generator=g), torch.rand(4, 1, 16, generator=g)
    rq, _ = layer_ops.rotary(q, k, cos, sin)
    assert rq.data_ptr() != q.data_ptr()
    rq.sum().backward()
    assert q.grad is not None
    gu = torch.randn(3, 64, generator=g, requires_grad=True)
    layer_ops.silu_and_mul(gu).sum().backward()
    assert gu.grad is not None and gu.grad.abs().sum() > 0
