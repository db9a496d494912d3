"""bench_serving's comparison tables: every adapter count against the same round's first count (with medians
over rounds), and against the peer server per round *and* adapter count (it compared only the first count)."""
from __future__ import annotations

import importlib.util
import math
import sys

from tests.server_proc import ROOT

spec = importlib.util.spec_from_file_location("bench_serving", ROOT / "bench" / "bench_serving.py")
bs = importlib.util.module_from_spec(spec)
sys.modules.setdefault("bench_serving", bs)  # its dataclasses look their module up
spec.loader.exec_module(bs)


def summary(req_s, ttft_p99, requests=10, completed=10):
    return {"req_s": req_s, "tok_s": req_s * 32, "ttft_p50": ttft_p99 / 2, "ttft_p99": ttft_p99, "tpot_p50": 0.1,
            "requests": requests, "completed": completed}


def test_counts_are_compared_within_each_round_and_summarised_by_medians():
    runs = [(0, "tessera-grpc", 5, summary(4.0, 1.0)), (0, "tessera-grpc", 1000, summary(3.0, 2.0)),
            (1, "tessera-grpc", 5, summary(2.0, 4.0)), (1, "tessera-grpc", 1000, summary(2.0, 2.0)),
            (2, "tessera-grpc", 5, summary(1.0, 1.0)), (2, "tessera-grpc", 1000, summary(0.9, 1.2))]
    rows, medians = bs.count_ratios(runs, [5, 1000])
    assert [(r, n, round(q, 3), round(t, 3)) for r, n, _, q, t in rows] == [
        (0, 5, 1.0, 1.0), (0, 1000, 0.75, 2.0), (1, 5, 1.0, 1.0), (1, 1000, 1.0, 0.5),
        (2, 5, 1.0, 1.0), (2, 1000, 0.9, 1.2)]
    assert medians == {1000: (0.9, 1.2)}  # medians of the per-round ratios, not ratios of pooled figures


def test_peer_table_covers_every_adapter_count():
    runs = [(0, "tessera-grpc", 0, summary(4.0, 1.0)), (0, "openai", 0, summary(2.0, 2.0)),
            (0, "tessera-grpc", 1000, summary(3.0, 1.0)), (0, "openai", 1000, summary(0.5, 0.0, completed=8))]
    got = bs.peer_ratios(runs)
    assert [(r, n) for r, n, _, _ in got] == [(0, 0), (0, 1000)]
    assert got[0][2]["req_s"] == 2.0 and got[1][2]["req_s"] == 6.0 and got[1][3] == (0, 2)
    assert math.isnan(got[1][2]["ttft_p99"])  # a zero in the peer's figure is no division error
