"""Start the real server process (`python -m server`) on free loopback ports for end-to-end tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from proto import tessera_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(target: str, proc: subprocess.Popen | None, timeout: float = 180.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text() if log else ''}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"server at {target} not SERVING after {timeout}s:\n{log.read_text() if log else ''}")


class ServerProcess:
    def __init__(self, tmp: Path, *args: str, env: dict | None = None):
        self.port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        self.log = tmp / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "server", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
               "--http-port", str(self.http_port), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        wait_serving(self.target, self.proc, log=self.log)
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.InferenceStub(self.channel)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metrics(self) -> dict[str, float]:
        """Every sample as 'name{label="v",...}' -> value, parsed with prometheus_client's parser."""
        out = {}
        for fam in text_string_to_metric_families(self.metrics_text()):
            for s in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
