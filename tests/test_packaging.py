"""The README's two commands, .ci/run, the checked-in gRPC stubs, the install scripts and the Docker build
agree with what they claim."""
from __future__ import annotations

import os
import re
import signal
import subprocess
from fnmatch import fnmatchcase

import pytest

from tests.server_proc import ROOT, wait_serving


def readme_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [c.strip() for c in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_ci_runs_the_readme_test_command():
    serve, test = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines()
    assert "python -m server" in serve and "pytest" in test


def test_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen", ROOT / "proto" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    for name in ("tessera_pb2.py", "tessera_pb2_grpc.py", "tessera_pb2.pyi"):
        assert (tmp_path / "proto" / name).read_text() == (ROOT / "proto" / name).read_text(), \
            f"proto/{name} is stale: run python proto/generate.py"


@pytest.mark.e2e
@pytest.mark.slow
def test_readme_first_command_sets_up_and_serves(tmp_path):
    """Runs the README's first command as written (setup.sh is idempotent) until the server is SERVING."""
    serve, _ = readme_commands()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(["bash", "-c", f"exec {serve}" if "&&" not in serve else serve], cwd=ROOT,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PIP_NO_INPUT": "1"})
    try:
        wait_serving("127.0.0.1:50051", proc, timeout=600, log=log)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0, log.read_text()[-3000:]
    assert "serving" in log.read_text()


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops `path` (relative, /-separated) or a folder above it: patterns are
    anchored at the context root, `**/` matches any depth (the subset of Docker's rules used here)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pat in patterns:
        if pat.startswith("**/"):
            tail = pat[3:]
            if any(fnmatchcase("/".join(parts[i:j]), tail) for j in range(1, len(parts) + 1) for i in range(j)):
                return True
        elif any(fnmatchcase(p, pat) for p in prefixes):
            return True
    return False


def test_docker_context_has_what_the_image_builds_from():
    docker = (ROOT / "Dockerfile").read_text()
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = [src for line in docker.splitlines() if line.startswith("COPY ") for src in line.split()[1:-1]]
    assert {"pyproject.toml", "setup.py", "README.md", "kernels"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which does not exist"
        assert not _dockerignored(src, patterns), f".dockerignore drops {src}"
    shipped = subprocess.run(["git", "ls-files", *[s for s in sources if (ROOT / s).is_dir()]], cwd=ROOT, capture_output=True,
                     text=True, check=True).stdout.split()
    assert any(f.endswith(".cpp") for f in shipped) and any(f.endswith(".proto") for f in shipped)
    dropped = [f for f in shipped if _dockerignored(f, patterns)]
    assert dropped == [], f".dockerignore drops tracked files the image needs: {dropped}"
    for local in (".venv/bin/python", ".git/HEAD", "kernels/__pycache__/x.pyc", "kernels/_cpu_x.so", "build/x.o",
                  "adapters/a/adapter_model.safetensors", "m.gguf"):
        assert _dockerignored(local, patterns), local
    # the C++ kernels build in the image against its CUDA torch, with the compiler Triton also needs
    assert "build-essential" in docker and 'pip install --no-build-isolation "/src[cuda]"' in docker


def test_installs_never_let_pip_resolve_torch_in_a_build_env():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not any("torch" in r for r in meta["build-system"]["requires"])
    assert not any(r.startswith("triton") for r in meta["project"]["dependencies"])  # 1 GB a CPU box never runs
    extras = meta["project"]["optional-dependencies"]
    assert any(r.startswith("triton") for r in extras["cuda"]) and any(r.startswith("triton") for r in extras["test"])
    installs = [line for line in (ROOT / "setup.sh").read_text().splitlines() if "$PIP install" in line and " -e " in line]
    assert len(installs) == 2 and all("--no-build-isolation" in line for line in installs), installs
