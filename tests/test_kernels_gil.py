"""The C++ CPU kernels release the GIL while they compute (as torch's own ops do): the engine thread's
matmuls and batched-LoRA calls must not stop the event loop, the adapter loaders and the prefetch thread
for the length of a kernel. Each check runs one long call (0.1-1 s) in a thread while this thread counts
how long it went without running Python: holding the GIL would make that gap the whole call. The shapes
make each call 50-130 ms on this 2-core VM, so that a core several times faster still gives one > 10 ms."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from kernels import cpu_ext
from kernels.quant import quantize_int4, quantize_int8
from tests import lora_scenarios as scen


def _longest_gap_during(fn) -> tuple[float, float]:
    """(seconds fn took in a worker thread, the longest this thread waited to run Python meanwhile)."""
    started, done, took = threading.Event(), threading.Event(), []

    def work():
        started.set()
        t0 = time.perf_counter()
        fn()
        took.append(time.perf_counter() - t0)
        done.set()

    th = threading.Thread(target=work)
    th.start()
    started.wait()
    gap, last = 0.0, time.perf_counter()
    while not done.is_set():
        now = time.perf_counter()
        gap, last = max(gap, now - last), now
        time.sleep(0.0005)
    th.join()
    return took[0], gap


def _calls():
    g = torch.Generator().manual_seed(0)
    qgemm = cpu_ext.load("quant_gemm", "quantized matmul")
    w4 = quantize_int4(torch.randn(4096, 4096, generator=g), 32)
    w8 = quantize_int8(torch.randn(16384, 4096, generator=g))
    x_tiled, x_gemv = torch.randn(160, 4096, generator=g), torch.randn(16, 4096, generator=g)
    yield "int4_linear_tiled", 4, lambda: qgemm.int4_linear_tiled(x_tiled, w4.qweight, w4.scales, w4.mins, w4.group_size)
    yield "int8_linear", 10, lambda: qgemm.int8_linear(x_gemv, w8.qweight, w8.scales, w8.group_size)
    ops = cpu_ext.load("layer_ops", "layer ops")
    big, wt = torch.randn(20000, 2048, generator=g), torch.ones(2048)
    yield "rms_norm", 4, lambda: ops.rms_norm(big, wt, 1e-5)
    sgmv = cpu_ext.load("lora_sgmv", "batched LoRA (SGMV)")
    T, K, widths = 8192, 1024, (1024, 512)
    sc = scen.build([[[64, 64]] for _ in range(8)], K, widths, 256, torch.float32, gen=g)
    x, y = torch.randn(T, K, generator=g), torch.zeros(T, sum(widths))
    s0, sl, ss = scen.segments([t * 8 // T for t in range(T)])
    yield "lora_apply", 10, lambda: sgmv.lora_apply(y, x, sc.pool, sc.page_table, sc.pt_start, sc.desc, 0, [0, 1024],
                                                    list(widths), s0, sl, ss, 128)


@pytest.mark.skipif(not all(s == "compiled" for s in cpu_ext.status().values()), reason="CPU kernels not built")
def test_cpu_kernels_let_other_threads_run():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernel on one core, this thread on the other
    try:
        for name, reps, call in _calls():
            fn = lambda: [call() for _ in range(reps)]  # noqa: E731
            fn()  # warm
            for _ in range(3):  # a kernel that holds the GIL does so every time; another process taking this
                took, gap = _longest_gap_during(fn)  # thread's core (a busy neighbour worker) does not
                per_call = took / reps
                if gap < per_call / 2:
                    break
            assert per_call > 0.01, f"{name}: {per_call * 1000:.1f} ms per call is too short to tell"
            assert gap < per_call / 2, f"{name} held the GIL: {gap * 1000:.0f} ms without Python, {per_call * 1000:.0f} ms per call"
    finally:
        torch.set_num_threads(threads)
