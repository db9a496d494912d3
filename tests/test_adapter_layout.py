"""An adapter's layout is its descriptor tensor (server/adapters/layout.py): a LoRA adapter in host memory or
in device pages costs the garbage collector a handful of tracked objects, not hundreds (a full collection walks
them all holding the GIL, which stalled the engine thread with 1000 adapters in host memory). The per-slice
views the torch path reads are derived from it on first use and match the packed pages exactly."""
from __future__ import annotations

import gc

import pytest
import torch

from kernels.lora import ref_gather_rows
from server.adapters.manager import AdapterManager
from server.model.llama import LlamaModel

from tests.tiny_models import ALL_LINEAR, CFG, lora, tiny_loaded


@pytest.fixture(scope="module")
def model():
    return LlamaModel.from_loaded(tiny_loaded(), torch.float32, torch.device("cpu"), "none")


def _tracked() -> int:
    gc.collect()
    return len(gc.get_objects())


def test_host_and_device_adapters_are_few_tracked_objects(model, tmp_path):
    n = 24
    for i in range(n):
        lora(tmp_path / f"a{i}", rank=4 + i % 3, targets=ALL_LINEAR, seed=i)
    mgr = AdapterManager(model, adapter_root=tmp_path, device_memory=32 << 20, host_memory=256 << 20, max_lora_rank=64)
    mgr.load("a0")  # first-use caches (the model's Linear shapes, safetensors) outside the count
    mgr.make_resident("a0")
    before = _tracked()
    for i in range(1, n):
        mgr.load(f"a{i}")
    loaded = _tracked()
    per_host = (loaded - before) / (n - 1)
    for i in range(1, n):
        assert mgr.make_resident(f"a{i}")
    per_device = (_tracked() - loaded) / (n - 1)
    # 14 adapted Linears x 7 slices here; the old per-slice layout objects made this ~100 per host adapter
    assert per_host <= 12, per_host
    assert per_device <= 8, per_device


def test_views_derived_from_the_descriptor_match_the_pages(model, tmp_path):
    lora(tmp_path / "qv", rank=3, targets=("q_proj", "v_proj"), seed=1)
    lora(tmp_path / "all", rank=5, targets=ALL_LINEAR, seed=2)
    mgr = AdapterManager(model, adapter_root=tmp_path, device_memory=8 << 20, host_memory=64 << 20, max_lora_rank=64)
    held = [mgr.pool.allocate(1) for _ in range(mgr.pool.num_pages)]
    for h in held[::2]:  # every other page free: the second adapter's spans are scattered
        mgr.pool.free(h)
    for name, rank, slices in (("qv", 3, {"q_proj", "v_proj"}), ("all", 5, set(ALL_LINEAR))):
        mgr.load(name)
        assert mgr.make_resident(name)
        e = mgr.entries[name]
        packed, res, page = e.host, e.device, mgr.pool.page_size
        groups = res.groups
        assert res.groups is groups  # built once
        assert {s.name for g in groups.values() for s in g.slices} == slices
        assert len(groups) == CFG.num_hidden_layers * len({model.linear(0, s).slice_names[0] for s in slices})
        for key, g in packed.groups.items():
            rg = groups[key]
            a_host = packed.flat[g.a_pages[0] * page:g.a_pages[1] * page].view(g.rank, g.in_features)
            a_dev = rg.A if rg.A is not None else ref_gather_rows(mgr.pool.buffer, rg.a_pages, rg.rank, rg.in_features)
            assert torch.equal(a_dev, a_host) and g.rank == rank * len(g.slices)
            for s, rs in zip(g.slices, rg.slices):
                bt_host = packed.flat[s.bt_pages[0] * page:s.bt_pages[1] * page].view(s.r1 - s.r0, s.out_features)
                bt_dev = rs.Bt if rs.Bt is not None else ref_gather_rows(mgr.pool.buffer, rs.bt_pages, rs.r1 - rs.r0,
                                                                         rs.out_features)
                assert torch.equal(bt_dev, bt_host), (key, s.name)
                assert (s.cols, s.r1 - s.r0) == (model.linear(key[0], s.name).slice_offsets[s.name], rank)
