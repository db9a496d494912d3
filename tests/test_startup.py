"""Start-up failures are fast and say what is wrong in one line (issue 16 item 9)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from tests.server_proc import ROOT, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _server(*args: str, timeout: float = 60) -> tuple[int, str, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "server", "--metrics-port", str(free_port()), "--http-port",
                        str(free_port()), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stderr, time.monotonic() - t0


def test_a_port_in_use_exits_before_loading_the_model():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc, err, seconds = _server("--port", str(port))
    assert rc != 0
    assert f"port {port} is in use" in err
    assert "loading the GGUF" not in err and "Traceback" not in err
    assert seconds < 30  # imports only; the model took ~60 s to load before it failed


def test_an_http_port_in_use_exits_before_loading_the_model():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc, err, seconds = _server("--port", str(free_port()), "--http-port", str(port))
    assert rc != 0 and "Traceback" not in err
    assert f"cannot serve HTTP on 127.0.0.1:{port}" in err and "--http-port" in err
    assert "loading the GGUF" not in err
    assert seconds < 30


def test_a_wrong_model_path_is_one_line(tmp_path):
    rc, err, _ = _server("--port", str(free_port()), "--model", str(tmp_path / "missing.gguf"))
    assert rc != 0 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"--model {tmp_path / 'missing.gguf'}: no such file")
    (tmp_path / "config.json").write_text("{}")
    rc, err, _ = _server("--port", str(free_port()), "--model", str(tmp_path))
    assert rc != 0 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("cannot load the model:")


def test_help_lists_the_http_flags():
    r = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for flag in ("--http-port", "--served-model-name", "--api-key", "--admin-token", "--max-message-bytes"):
        assert flag in r.stdout, flag
    assert "OpenAI-compatible" in r.stdout
