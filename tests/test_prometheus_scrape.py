"""A real Prometheus (Debian's) scrapes the real server: the gateway's `vllm:` names survive intact."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from proto import tessera_pb2 as pb
from tests.server_proc import ServerProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="prometheus is not installed (./setup.sh --test installs it as root)")]


def _query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)["data"]["result"]


def test_real_prometheus_scrape(tmp_path):
    srv = ServerProcess(tmp_path)
    prom_port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"""global:
  scrape_interval: 1s
scrape_configs:
  - job_name: tessera
    static_configs:
      - targets: ["127.0.0.1:{srv.metrics_port}"]
""")
    prom = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prom.log").open("w"))
    try:
        list(srv.stub.Generate(pb.GenerateRequest(prompt="Hello there", max_new_tokens=5, ignore_eos=True)))
        deadline = time.monotonic() + 60
        while True:
            try:
                got = _query(prom_port, 'tessera_generation_tokens_total{job="tessera"}')
                if got and float(got[0]["value"][1]) >= 5:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "prom.log").read_text()[-2000:]
            time.sleep(0.5)
        for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
            res = _query(prom_port, name)
            assert len(res) == 1 and res[0]["metric"]["__name__"] == name, res
            assert float(res[0]["value"][1]) == 0.0
        assert _query(prom_port, "vllm_num_requests_running") == []  # not mangled to underscores
        assert _query(prom_port, 'tessera_requests_total{finish_reason="length"}')[0]["value"][1] == "1"
        hist = _query(prom_port, "tessera_time_to_first_token_seconds_count")
        assert float(hist[0]["value"][1]) == 1
    finally:
        prom.terminate()
        prom.wait(30)
        assert srv.stop() == 0
