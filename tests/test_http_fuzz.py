"""The HTTP API fuzzed from its own OpenAPI document (schemathesis): no generated request gets a 5xx and the
server keeps serving; then SIGTERM drains a running HTTP stream like a gRPC one."""
from __future__ import annotations

import json
import signal
import time

import httpx2 as httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from tests.server_proc import ServerProcess, wait_serving

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ADMIN = "fuzz-admin"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # a short context bounds every generated request's work (and the whole run's time)
    srv = ServerProcess(tmp_path_factory.mktemp("fuzz"), "--max-model-len", "48", "--default-max-new-tokens", "4",
                        "--admin-token", ADMIN, "--adapter-root", str(tmp_path_factory.mktemp("fuzz-root")),
                        "--shutdown-grace", "60")
    yield srv
    if srv.proc.poll() is None:
        assert srv.stop() == 0


OPERATIONS = ["POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "POST /v1/load_lora_adapter",
              "POST /v1/unload_lora_adapter", "GET /health", "GET /version", "GET /metrics"]


@pytest.fixture(scope="module")
def operations(server):
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    ops = {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}
    assert set(OPERATIONS) <= set(ops), sorted(ops)
    return ops


# (schemathesis' own pytest loader does not run on pytest 9: its strategies drive hypothesis directly here)
# bodies that fit the schema, and (for the operations that take a body) bodies that do not
CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + [
    (label, GenerationMode.NEGATIVE) for label in OPERATIONS if label.startswith("POST")]


@pytest.mark.parametrize("label,mode", CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
def test_no_generated_request_gets_a_server_error(operations, server, label, mode):
    seen = {}
    examples = 60 if "completions" in label else 20

    @given(case=operations[label].as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def fuzz(case):
        r = case.call_and_validate(base_url=server.base_url, headers={"authorization": f"Bearer {ADMIN}"},
                                   checks=[not_a_server_error], timeout=60)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1

    fuzz()
    print(label, mode, seen)
    assert all(code < 500 for code in seen), seen


def test_still_serving_after_the_fuzz(server):
    wait_serving(server.target, server.proc, timeout=5)
    r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "temperature": 0},
                   timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_sigterm_drains_http_streams(server):
    """Last in this file: it stops the server."""
    body = {"prompt": "Write a poem about rain.", "max_tokens": 40, "ignore_eos": True, "stream": True,
            "temperature": 0, "return_token_ids": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{server.base_url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        first = next(lines)
        assert first.startswith("data: ")
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.base_url}/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        late = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "too late", "max_tokens": 2})
        assert late.status_code == 503 and late.json()["error"]["type"] == "service_unavailable"
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in rest[-2]
    chunks = [json.loads(x.removeprefix("data: ")) for x in [first, *rest[:-1]]]
    assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 40
    assert server.proc.wait(60) == 0
