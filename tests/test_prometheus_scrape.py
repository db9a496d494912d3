"""A real Prometheus (Debian's) scrapes the real server: the gateway's `vllm:` names survive intact, and every
query of the shipped dashboard (deploy/grafana/tessera.json) and alert rule (deploy/prometheus/tessera-rules.yml)
finds the series it is written against.

The queries are read from the two files, so a panel or a rule added there is checked here without editing this
test. What is asserted:

- dashboard: each panel query, with Grafana's variables replaced by concrete values ($__rate_interval -> 5m,
  $job / $instance -> the scraped target), evaluates with status success and a non-empty result, and every
  label its legend names (`{{reason}}`) is on every returned series; each template variable's
  `label_values(selector, label)` finds that label on the selector's series.
- alert rules: each rule's expression evaluates with status success (a valid query against the live data), and
  every series selector inside it returns data. The full expression is NOT required to return data: an alert is
  empty while nothing is wrong (up == 0, queue > 64, ...), so checking that its inputs exist is what catches a
  misspelled metric or label. The rule file is also loaded into the live Prometheus (every rule must evaluate
  with health "ok"), where the adapter-load failure provoked below must make TesseraAdapterLoadFailures fire
  and nothing else may fire; `promtool test rules` checks, on synthetic series, that each alert fires under its
  failure and stays quiet when healthy.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch
import yaml  # PyYAML: installed with transformers / huggingface_hub

from loader.adapters.lora import random_lora, save_adapter
from proto import tessera_pb2 as pb
from tests.server_proc import ROOT, ServerProcess, free_port

# only the live test starts the server and Prometheus (e2e, slow); the checks of the files alone are quick
needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None,
                                      reason="prometheus is not installed (./setup.sh --test installs it as root)")
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")

DASHBOARD = ROOT / "deploy" / "grafana" / "tessera.json"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "tessera-rules.yml"
WINDOW = "5m"  # Grafana's range variables here: >= 2 scrapes at the test's 1s interval, longer than any wait
GOOD, BAD = "good-r4", "bad-json"
# SmolLM2-135M, the embedded default model: 30 layers, hidden 576, 9 query heads and 3 KV heads of 64
SMOLLM2 = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, head_dim=64)


def _query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)["data"]["result"]


def _api(port: int, path: str, **params) -> dict:
    """Prometheus' JSON answer, also for a refused query (400 / 422 carry `error` in the body)."""
    url = f"http://127.0.0.1:{port}{path}?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.load(r)
    except urllib.error.HTTPError as exc:
        return json.load(exc)


# -- the queries of the deploy files ----------------------------------------------------------------------------
def grafana_substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variable syntaxes ($name, ${name}, ${name:format}, [[name]]) -> values; an unknown one fails."""
    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        assert name in values, f"dashboard query uses ${name}, which this test does not know: {expr}"
        return values[name]
    return re.sub(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]", repl, expr)


def dashboard_queries(dash: dict) -> list[tuple[str, str, str]]:
    """(where, expr, legendFormat) of every panel target, rows' nested panels included."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"panel {p['title']!r} {t.get('refId', '')}", t["expr"], t.get("legendFormat", "")))
            walk(p.get("panels", []))
    walk(dash["panels"])
    return out


def variable_queries(dash: dict) -> list[tuple[str, str]]:
    """label_values(selector, label) of each query variable, as a query that must return that label."""
    out = []
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", q)
        assert m, f"variable {v['name']}: only label_values(selector, label) is checked here, got {q!r}"
        out.append((f"variable {v['name']}", f"count by ({m[2]}) ({m[1]})"))
    return out


def rule_exprs(rules: dict) -> list[tuple[str, str]]:
    return [(r.get("alert") or r["record"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


_TOKEN = re.compile(r'''"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`   # strings
                        |\{(?:"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|[^}"'])*\}   # label matchers
                        |\[[^\]]*\]                                             # ranges, subqueries
                        |\d[\w.]*                                               # numbers, durations
                        |[A-Za-z_:][\w:]*                                       # names, keywords
                        |\S''', re.X)
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end",
             # aggregations, which may be followed by `by (...)` rather than `(`
             "sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile",
             "count_values", "limitk", "limit_ratio"}
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}


def selectors(expr: str) -> list[str]:
    """The series selectors of a PromQL expression (`name{matchers}`), without a PromQL parser: names that are
    neither functions (followed by `(`), aggregations nor keywords, outside strings, ranges and the label lists
    of by / without / on / ignoring / group_left / group_right."""
    toks = [m.group() for m in _TOKEN.finditer(expr)]
    out, i = [], 0
    while i < len(toks):
        t, nxt = toks[i], toks[i + 1] if i + 1 < len(toks) else ""
        if t in _LABEL_LISTS:
            if nxt == "(":
                i = toks.index(")", i)
        elif t.startswith("{"):
            out.append(t)  # a selector without a metric name
        elif re.fullmatch(r"[A-Za-z_:][\w:]*", t) and t not in _KEYWORDS and nxt != "(":
            out.append(t + nxt if nxt.startswith("{") else t)
            i += nxt.startswith("{")
        i += 1
    return out


def test_selectors_finds_the_series_of_a_rule():
    assert selectors('sum by (job, reason) (increase(a_total{job="t", x=~"(b|c)"}[10m])) > 0 or '
                     'sum by (job) (a_total unless on (job) vllm:b offset 10m) > 0.5') == \
        ['a_total{job="t", x=~"(b|c)"}', "a_total", "vllm:b"]
    assert selectors('absent(up{job="tessera"})') == ['up{job="tessera"}']
    assert selectors('histogram_quantile(0.99, sum(rate(h_bucket[5m])) by (le))') == ["h_bucket"]


# -- the files themselves ---------------------------------------------------------------------------------------
def test_deploy_files_are_valid():
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41 and dash["uid"] and dash["title"]
    names = {v["name"]: v for v in dash["templating"]["list"]}
    assert names["DS_PROMETHEUS"]["type"] == "datasource" and names["DS_PROMETHEUS"]["query"] == "prometheus"
    ids, queries = [], 0

    def walk(panels):
        nonlocal queries
        for p in panels:
            ids.append(p["id"])
            if p["type"] != "row":
                assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
                assert all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]
                assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
                queries += len(p["targets"])
            walk(p.get("panels", []))
    walk(dash["panels"])
    assert len(ids) == len(set(ids)) and queries >= 20
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "tessera"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9400"]  # the server's --metrics-port default
    assert {r["alert"] for r in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]} >= {
        "TesseraTargetDown", "TesseraQueueSaturated", "TesseraKVCacheNearlyFull", "TesseraAdapterLoadFailures"}
    if shutil.which("promtool"):
        for cmd in (["check", "rules", str(RULES)], ["check", "config", str(PROM_CONFIG)]):
            r = subprocess.run(["promtool", *cmd], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_alerts_fire_under_their_failures(tmp_path):
    """Synthetic series through `promtool test rules`: the set of firing alerts at each moment, exactly."""
    a = 'job="tessera", instance="a:9400"'

    def firing(*alerts):
        return [{"labels": "ALERTS{" + ", ".join(f'{k}="{v}"' for k, v in {
            "alertname": name, "alertstate": "firing", "severity": sev, **labels}.items()) + "}", "value": 1}
            for name, sev, labels in alerts]
    inst = {"job": "tessera", "instance": "a:9400"}
    healthy = [(f"up{{{a}}}", "1x40"), (f"vllm:num_requests_running{{{a}}}", "2x40"),
               (f"vllm:num_requests_waiting{{{a}}}", "3x40"), (f"vllm:kv_cache_usage_perc{{{a}}}", "0.5x40"),
               (f"tessera_num_preemptions_total{{{a}}}", "7x40"),
               (f'tessera_adapter_load_failures_total{{{a}, reason="invalid"}}', "2x40")]  # old failures only
    cases = [  # (input series, [(minute, firing alerts)])
        (healthy, [(30, [])]),
        ([(f"up{{{a}}}", "1x3 0x20"), (f"vllm:num_requests_running{{{a}}}", "0x3")],
         [(3, []), (6, firing(("TesseraTargetDown", "critical", inst)))]),
        ([('up{job="other", instance="b:1"}', "1x20")],
         [(3, []), (6, firing(("TesseraTargetMissing", "critical", {"job": "tessera"})))]),
        ([(f"up{{{a}}}", "1x20")],  # answers, but the engine gauges never appear: the model is not loaded
         [(9, []), (11, firing(("TesseraModelNotLoaded", "critical", inst)))]),
        ([(f"up{{{a}}}", "1x40"), (f"vllm:num_requests_running{{{a}}}", "64x40"),
          (f"vllm:num_requests_waiting{{{a}}}", "200x40"), (f"vllm:kv_cache_usage_perc{{{a}}}", "0.99x40"),
          (f"tessera_num_preemptions_total{{{a}}}", "0+60x40")],  # 1 preemption/s
         [(1, []), (15, firing(("TesseraKVCacheNearlyFull", "warning", inst), ("TesseraPreempting", "warning", inst),
                                ("TesseraQueueNearlyFull", "critical", inst),
                                ("TesseraQueueSaturated", "warning", inst)))]),
        # the first failure creates the series (no increase() to see), then it stays, then one more failure
        (healthy[:5] + [(f'tessera_adapter_load_failures_total{{{a}, reason="invalid"}}', "_x5 1x20 2x10")],
         [(4, []), (7, firing(("TesseraAdapterLoadFailures", "warning", {**inst, "reason": "invalid"}))),
          (20, []), (28, firing(("TesseraAdapterLoadFailures", "warning", {**inst, "reason": "invalid"})))]),
    ]
    tests = [{"interval": "1m",
              "input_series": [{"series": s, "values": v} for s, v in series],
              "promql_expr_test": [{"expr": 'ALERTS{alertstate="firing"}', "eval_time": f"{t}m", "exp_samples": exp}
                                   for t, exp in evals]} for series, evals in cases]
    spec = tmp_path / "rules-test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}))
    r = subprocess.run(["promtool", "test", "rules", str(spec)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# -- the live scrape --------------------------------------------------------------------------------------------
def _adapters(root: Path) -> Path:
    save_adapter(root / GOOD, {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
                               "target_modules": ["q_proj", "v_proj"]},
                 random_lora(SMOLLM2, 4, ["q_proj", "v_proj"], torch.Generator().manual_seed(0), None, 0.01))
    (root / BAD).mkdir(parents=True)
    (root / BAD / "adapter_config.json").write_text("{r: 4,")  # refused at load: reason "invalid"
    return root


def _prometheus_config(tmp_path: Path, metrics_port: int) -> Path:
    """deploy/prometheus/prometheus.yml as shipped, pointed at the test server, scraping and evaluating every 1s."""
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(RULES)]
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "tessera"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stream_until_scraped(srv: ServerProcess, prom_port: int, adapter: str) -> None:
    """Keep a long adapter request running until Prometheus has scraped it (the per-adapter gauge exists only
    while the adapter has requests), then cancel it: a CANCELLED finish, tokens, inter-token gaps."""
    deadline = time.monotonic() + 120
    while True:
        call = srv.stub.Generate(pb.GenerateRequest(prompt="Tell me a long story", max_new_tokens=256,
                                                    ignore_eos=True, adapter_id=adapter))
        done, errors, seen = threading.Event(), [], False

        def drain():
            try:
                for _ in call:
                    pass
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    errors.append(exc)
            done.set()
        t = threading.Thread(target=drain, daemon=True)
        t.start()
        while not done.is_set():
            if _query(prom_port, f'tessera_adapter_requests{{adapter_id="{adapter}", state="running"}}'):
                seen = True
                call.cancel()
                break
            time.sleep(0.2)
        t.join(30)
        assert not errors and done.is_set(), errors or "the cancelled stream did not end"
        if seen:
            return
        assert time.monotonic() < deadline, "Prometheus never scraped a running adapter request"


def _check_dashboard(prom_port: int, values: dict) -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    problems = []
    for where, expr, legend in dashboard_queries(dash):
        q = grafana_substitute(expr, values)
        r = _api(prom_port, "/api/v1/query", query=q)
        if r.get("status") != "success":
            problems.append(f"{where}: {q}: {r.get('error')}")
        elif not r["data"]["result"]:
            problems.append(f"{where}: {q}: no data")
        else:
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
                if not all(s["metric"].get(label) for s in r["data"]["result"]):
                    problems.append(f"{where}: {q}: the legend names {label!r}, a series lacks it: "
                                    f"{r['data']['result']}")
    for where, q in variable_queries(dash):
        r = _api(prom_port, "/api/v1/query", query=grafana_substitute(q, values))
        if r.get("status") != "success" or not r["data"]["result"]:
            problems.append(f"{where}: {q}: {r.get('error') or 'no data'}")
    return problems


def _check_rules(prom_port: int) -> list[str]:
    problems = []
    for name, expr in rule_exprs(yaml.safe_load(RULES.read_text())):
        r = _api(prom_port, "/api/v1/query", query=expr)
        if r.get("status") != "success":
            problems.append(f"rule {name}: {expr}: {r.get('error')}")
        for sel in selectors(expr):
            r = _api(prom_port, "/api/v1/query", query=sel)
            if r.get("status") != "success" or not r["data"]["result"]:
                problems.append(f"rule {name}: selector {sel}: {r.get('error') or 'no data'}")
    rules = [r for g in _api(prom_port, "/api/v1/rules")["data"]["groups"] for r in g["rules"]]
    if len(rules) != len(rule_exprs(yaml.safe_load(RULES.read_text()))):
        problems.append(f"Prometheus loaded {len(rules)} rules")
    for r in rules:
        if r["health"] != "ok":
            problems.append(f"rule {r['name']}: health {r['health']} {r.get('lastError', '')}")
    firing = {(a["labels"]["alertname"], a["labels"].get("reason")) for a in
              _api(prom_port, "/api/v1/alerts")["data"]["alerts"] if a["state"] == "firing"}
    if firing != {("TesseraAdapterLoadFailures", "invalid")}:
        problems.append(f"firing alerts: {sorted(firing, key=str)}, expected only the adapter load failure")
    return problems


@pytest.mark.e2e
@pytest.mark.slow
@needs_prometheus
def test_real_prometheus_scrape(tmp_path):
    srv = ServerProcess(tmp_path, "--adapter-root", str(_adapters(tmp_path / "adapters")))
    prom_port = free_port()
    cfg = _prometheus_config(tmp_path, srv.metrics_port)
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

        # load that moves the adapter series: an on-demand adapter load from disk and a request on it
        # (cancelled once scraped), an adapter that fails to load (a load failure and a rejected request)
        _stream_until_scraped(srv, prom_port, GOOD)
        with pytest.raises(grpc.RpcError) as bad:
            list(srv.stub.Generate(pb.GenerateRequest(prompt="Hello", max_new_tokens=2, adapter_id=BAD)))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad.value
        list(srv.stub.Generate(pb.GenerateRequest(prompt="Hello there", max_new_tokens=3, adapter_id=GOOD)))
        assert srv.metrics()['tessera_adapter_load_failures_total{reason="invalid"}'] == 1

        values = {"__rate_interval": WINDOW, "__interval": WINDOW, "__range": WINDOW, "__range_s": "300",
                  "job": "tessera", "instance": f"127.0.0.1:{srv.metrics_port}"}
        deadline = time.monotonic() + 60  # until rate() has two samples of the newest series, and rules ran
        while problems := _check_dashboard(prom_port, values) + _check_rules(prom_port):
            assert time.monotonic() < deadline, "\n".join(problems)
            time.sleep(1)
    finally:
        prom.terminate()
        prom.wait(30)
        assert srv.stop() == 0
