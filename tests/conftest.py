"""Without a GPU, Triton kernels run in Triton's CPU interpreter. Set before any kernel module is imported
(triton.jit reads it when a kernel is defined)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
