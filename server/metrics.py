"""Prometheus metrics: request counters and latency histograms (vLLM's buckets), engine gauges.

Gauges are read from the engine at scrape time. The Kubernetes inference gateway reads vLLM's
names (`vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc` and its older
name `vllm:gpu_cache_usage_perc`, `vllm:lora_requests_info`), so those are exported too, on the metrics
port and on the HTTP port's /metrics. The endpoint always answers in the classic text format (0.0.4): when a
scraper asks for OpenMetrics, prometheus_client 0.26 would rewrite `vllm:x` as `vllm_x`, and the
gateway would no longer find its gauges.
"""
from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from server.engine.request import RequestOutput

log = logging.getLogger("tessera.metrics")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector:
    """Gauges read from the engine when scraped (no background polling)."""

    def __init__(self, read: Callable[[], dict]):
        self.read = read

    def collect(self):
        s = self.read()
        if s is None:  # the model is still loading
            return
        for prefix in ("tessera_", "vllm:"):
            yield GaugeMetricFamily(f"{prefix}num_requests_running", "Requests in the running batch.",
                                    value=s["num_running"])
            yield GaugeMetricFamily(f"{prefix}num_requests_waiting", "Requests waiting to be scheduled.",
                                    value=s["num_waiting"])
            yield GaugeMetricFamily(f"{prefix}kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                                    value=s["kv_usage"])
        # the older name of the same gauge, which gateways and dashboards built on vLLM < 0.10 still read
        yield GaugeMetricFamily("vllm:gpu_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1); the same "
                                "value as vllm:kv_cache_usage_perc.", value=s["kv_usage"])
        yield GaugeMetricFamily("tessera_kv_cache_blocks_total", "KV-cache blocks.", value=s["kv_blocks_total"])
        yield GaugeMetricFamily("tessera_kv_cache_blocks_used", "KV-cache blocks in use.", value=s["kv_blocks_used"])
        yield GaugeMetricFamily("tessera_model_weight_bytes", "Bytes of resident base-model weights.",
                                value=s["weight_bytes"])
        yield CounterMetricFamily("tessera_num_preemptions", "Sequences preempted for lack of KV blocks.",
                                  value=s["num_preemptions"])
        tiers = GaugeMetricFamily("tessera_adapters_resident", "Registered adapters by where they are resident.",
                                  labels=["tier"])
        for tier in ("device", "host", "disk"):
            tiers.add_metric([tier], s["adapter_tiers"].get(tier, 0))
        yield tiers
        yield GaugeMetricFamily("tessera_adapter_pool_pages", "Pages of the device adapter pool.",
                                value=s["adapter_pool_pages"])
        yield GaugeMetricFamily("tessera_adapter_pool_pages_used", "Pages of the device adapter pool in use.",
                                value=s["adapter_pool_pages_used"])
        yield CounterMetricFamily("tessera_adapter_prefetches", "LoRA adapters copied into the device pool ahead of "
                                  "their queued requests' admission (by the prefetch thread).",
                                  value=s["adapter_prefetches"])
        yield CounterMetricFamily("tessera_adapter_pool_evictions", "Adapters evicted from the device pool to make "
                                  "room (their host copy stays).", value=s["adapter_pool_evictions"])
        kinds = GaugeMetricFamily("tessera_adapters_loaded", "Registered adapters by kind.", labels=["kind"])
        for kind, n in sorted(s["adapter_kinds"].items()):
            kinds.add_metric([kind], n)
        yield kinds
        yield GaugeMetricFamily("tessera_adapter_kv_blocks", "Cached KV-cache blocks holding prefix/prompt-tuning "
                                "adapters' virtual tokens (counted once, whatever number of requests use them).",
                                value=s["adapter_kv_blocks"])
        yield GaugeMetricFamily("tessera_kv_cache_blocks_cached", "KV-cache blocks in the prefix cache (in use or "
                                "idle; idle ones are evicted least recently used first when blocks run out).",
                                value=s["kv_blocks_cached"])
        # vLLM's names and meaning: cache positions (tokens) looked up at admission, and of them found cached
        yield CounterMetricFamily("vllm:prefix_cache_queries", "Prefix cache lookups, in tokens.",
                                  value=s["prefix_cache_queries"])
        yield CounterMetricFamily("vllm:prefix_cache_hits", "Prefix cache hits, in tokens.",
                                  value=s["prefix_cache_hits"])
        q = s["prefix_cache_queries"]
        yield GaugeMetricFamily("tessera_prefix_cache_hit_rate", "Prefix cache hits / queries since start, in tokens "
                                "(over a window: rate(vllm:prefix_cache_hits[5m]) / rate(vllm:prefix_cache_queries[5m])).",
                                value=s["prefix_cache_hits"] / q if q else 0.0)
        per = GaugeMetricFamily("tessera_adapter_requests", "Requests per adapter (adapters in the registry only).",
                                labels=["adapter_id", "state"])
        for state in ("running", "waiting"):
            for adapter_id, n in sorted(s[f"adapters_{state}"].items()):
                per.add_metric([adapter_id, state], n)
        yield per
        # The inference gateway's LoRA affinity reads this one; the value is a timestamp, as in vLLM.
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running and waiting LoRA adapters.",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(sorted(s["adapters_running"])), ",".join(sorted(s["adapters_waiting"])),
                         str(s["max_loras"])], time.time())
        yield info


class Metrics:
    def __init__(self, read_engine: Callable[[], dict]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tessera_requests", "Finished requests by finish reason.", ["finish_reason"],
                                registry=r)
        self.prompt_tokens = Counter("tessera_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("tessera_generation_tokens", "Generated tokens streamed (cancelled "
                                         "requests' too).", registry=r)
        self.rejected = Counter("tessera_requests_rejected", "Requests refused before admission, by gRPC code.",
                                ["code"], registry=r)
        self.ttft = Histogram("tessera_time_to_first_token_seconds", "Arrival to first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("tessera_inter_token_latency_seconds", "Time between consecutive output tokens.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("tessera_e2e_request_latency_seconds", "Arrival to finish.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("tessera_request_queue_time_seconds", "Arrival to first scheduled.",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_load = Histogram("tessera_adapter_load_seconds", "Adapter load latency by source (disk, host).",
                                      ["source"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5,
                                                           1.0, 2.5, 5.0, 10.0), registry=r)
        self.adapter_failures = Counter("tessera_adapter_load_failures", "Adapter loads refused, by reason.",
                                        ["reason"], registry=r)
        r.register(_EngineCollector(read_engine))
        self._server: ThreadingHTTPServer | None = None

    # AdapterObserver (called from the adapter manager's threads)
    def adapter_loaded(self, source: str, seconds: float) -> None:
        self.adapter_load.labels(source).observe(seconds)

    def adapter_load_failed(self, reason: str) -> None:
        self.adapter_failures.labels(reason).inc()

    def observe_token_gap(self, seconds: float, n_tokens: int) -> None:
        for _ in range(n_tokens):
            self.itl.observe(seconds / max(1, n_tokens))

    def observe_finished(self, out: RequestOutput) -> None:
        self.requests.labels(out.finish_reason.value).inc()
        if out.stats is None:
            return
        st = out.stats
        self.prompt_tokens.inc(st.prompt_tokens)  # generation tokens are counted as they stream
        if st.generated_tokens:
            self.ttft.observe(st.time_to_first_token_s)
        self.e2e.observe(st.e2e_latency_s)
        self.queue.observe(st.queue_time_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- the /metrics endpoint ------------------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                body = metrics.render()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes every few seconds: keep them out of the log
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="tessera-metrics", daemon=True).start()
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
