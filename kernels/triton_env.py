"""What the Triton kernels need to know about where they run.

Under `TRITON_INTERPRET=1` (the CPU test path) kernels run in Triton's numpy interpreter, whose
`tl.dot` mis-reads bfloat16 operands; kernels then take their dot products in fp32, which is the
same arithmetic (a bf16 x bf16 product is exact in fp32) and the same fp32 accumulation.

Triton is optional (the `cuda` and `test` extras): without it the kernel modules still import, for
the CPU paths, and launching a kernel raises.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install: nothing there launches a Triton kernel
    triton = tl = None


def jit(fn):
    """triton.jit, or without Triton the undecorated function (never launched: require_triton refuses)."""
    return fn if triton is None else triton.jit(fn)


def require_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton kernels need Triton: pip install 'tessera[cuda]'")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_triton(t: torch.Tensor) -> bool:
    """True when a kernel can take this tensor: on CUDA, or any device under the interpreter."""
    return t.is_cuda or interpreting()


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether a kernel must upcast `dtype` operands before tl.dot."""
    return dtype == torch.float32 or (interpreting() and dtype == torch.bfloat16)


def check(cond: bool, msg: str) -> None:
    """Wrapper argument checks (ValueError, not assert: they guard callers' tensors)."""
    if not cond:
        raise ValueError(msg)
