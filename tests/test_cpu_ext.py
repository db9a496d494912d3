"""The C++ CPU kernels are prebuilt at install time: they import without compiling, every one is
reported by status(), a missing one falls back loudly, and nothing needs Triton on a CPU install."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from kernels import cpu_ext
from tests.server_proc import ROOT

# What the callers (kernels/*.py) call on each module.
FUNCTIONS = {
    "lora_sgmv": {"lora_shrink", "lora_expand", "lora_apply"},
    "quant_gemm": {"int4_linear", "int8_linear", "int4_linear_tiled", "int8_linear_tiled", "int4_dequantize",
                   "int8_dequantize"},
    "paged_attention": {"paged_decode", "paged_prefill"},
    "layer_ops": {"rms_norm", "rotary_", "silu_mul", "silu_mul_available"},
}

_NO_COMPILE = """
import json, sys
import torch.utils.cpp_extension as cx
def refuse(*a, **k):
    raise AssertionError("a kernel was compiled at run time")
cx.load = cx.load_inline = refuse
from kernels import cpu_ext
mods = {name: cpu_ext.load(name, name) for name in cpu_ext.KERNELS}
print(json.dumps({"status": cpu_ext.status(),
                  "files": {n: m.__file__ if m else None for n, m in mods.items()},
                  "functions": {n: sorted(f for f in dir(m) if not f.startswith("_")) if m else [] for n, m in mods.items()}}))
"""


def test_prebuilt_kernels_import_without_compiling(tmp_path):
    ext_dir = tmp_path / "torch_extensions"
    ext_dir.mkdir()
    out = subprocess.run([sys.executable, "-c", _NO_COMPILE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TORCH_EXTENSIONS_DIR": str(ext_dir)})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["status"] == {name: "compiled" for name in cpu_ext.KERNELS}, \
        f"{got['status']}: run ./setup.sh (pip install --no-build-isolation -e .) to build the kernels"
    for name, path in got["files"].items():
        assert path.startswith(str(ROOT / "kernels" / f"_cpu_{name}.")) and path.endswith(".so"), path
        assert FUNCTIONS[name] <= set(got["functions"][name]), (name, got["functions"][name])
    assert list(ext_dir.iterdir()) == []  # torch's runtime build cache was never touched


def test_status_reports_every_kernel_source():
    sources = {p.stem for p in (ROOT / "kernels" / "cpu").glob("*.cpp")}
    assert set(cpu_ext.KERNELS) == sources == set(FUNCTIONS)
    assert set(cpu_ext.status()) == sources
    assert all(s == "compiled" or s.startswith("fallback: ") for s in cpu_ext.status().values())


def test_missing_kernel_falls_back_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(cpu_ext, "KERNELS", (*cpu_ext.KERNELS, "not_a_kernel"))
    with caplog.at_level(logging.INFO, logger="tessera.kernels"):
        assert cpu_ext.load("not_a_kernel", "imaginary") is None
        state = cpu_ext.status()["not_a_kernel"]
        cpu_ext.log_status()
    assert state.startswith("fallback: not built") and "setup.sh" in state
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("imaginary" in w and "not_a_kernel" in w and "plain-torch" in w for w in warnings), warnings
    assert any(w.startswith("CPU kernels compiled: ") and "fallback" in w and "not_a_kernel: not built" in w
               for w in warnings), warnings


def test_kernel_edited_after_the_build_warns(tmp_path, monkeypatch, caplog):
    built = tmp_path / "_cpu_k.so"
    built.write_bytes(b"")
    (tmp_path / "k.cpp").write_text("// edited")
    (tmp_path / "simd.h").write_text("// unchanged")
    os.utime(built, (1000, 1000))
    os.utime(tmp_path / "k.cpp", (2000, 2000))
    os.utime(tmp_path / "simd.h", (500, 500))
    monkeypatch.setattr(cpu_ext, "_SOURCES", tmp_path)
    with caplog.at_level(logging.WARNING, logger="tessera.kernels"):
        cpu_ext._warn_if_stale("k", built)
    [msg] = [r.getMessage() for r in caplog.records]
    assert "CPU kernel k was built before the last change to k.cpp:" in msg and "simd.h" not in msg


_NO_TRITON = """
import sys
sys.modules["triton"] = None  # as if not installed: `import triton` raises ImportError
import torch
import server.adapters.kernel_batch, server.model.llama
from kernels.quant import quantize_int8
from kernels.quant_matmul import cpu_quant_linear, ref_quant_linear, triton_quant_linear
w = quantize_int8(torch.randn(8, 64))
x = torch.randn(3, 64)
assert torch.allclose(cpu_quant_linear(x, w), ref_quant_linear(x, w), atol=1e-4)
try:
    triton_quant_linear(x, w)
except RuntimeError as exc:
    print(exc)
"""


def test_cpu_install_runs_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _NO_TRITON], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pip install 'tessera[cuda]'" in out.stdout
