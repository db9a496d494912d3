"""The README's two commands, .ci/run and the checked-in gRPC stubs agree with what they claim."""
from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

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
