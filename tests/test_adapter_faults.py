"""Adapter loads that go wrong, on a tiny random Llama (fast, no PEFT): every malformed config field,
broken file and impossible budget is one AdapterLoadError with the reason the gRPC layer maps and a
message naming the field or the flag; the host tier never drops the adapter it just read; a
prompt-learning adapter whose prefix can never fit the KV budget is refused at load."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from server.errors import AdapterLoadError
from server.adapters.manager import AdapterManager
from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.model.llama import LlamaModel

from tests.tiny_models import ALL_LINEAR, CFG, KV_DIM, adaption, ia3, lora, prompt, tiny_loaded


@pytest.fixture(scope="module")
def model():
    return LlamaModel.from_loaded(tiny_loaded(), torch.float32, torch.device("cpu"), "none")


def manager(model, root: Path, device: int = 8 << 20, host: int = 64 << 20) -> AdapterManager:
    return AdapterManager(model, adapter_root=root, device_memory=device, host_memory=host, max_lora_rank=64)


# -- item 3: malformed configs are "invalid" and name the field ---------------------------------------------------
MALFORMED = [  # (writer, config overrides, the field the message must name)
    (lora, {"target_modules": "(["}, "target_modules"),
    (lora, {"target_modules": [1, ["q_proj"]]}, "target_modules"),
    (lora, {"rank_pattern": {"(": 4}}, "rank_pattern"),
    (lora, {"rank_pattern": {"q_proj": "big"}}, "rank_pattern"),
    (lora, {"rank_pattern": ["q_proj"]}, "rank_pattern"),
    (lora, {"alpha_pattern": {"q_proj": "big"}}, "alpha_pattern"),
    (lora, {"alpha_pattern": {"(": 2.0}}, "alpha_pattern"),
    (lora, {"layers_to_transform": 5.5}, "layers_to_transform"),
    (lora, {"layers_to_transform": [0, "1"]}, "layers_to_transform"),
    (lora, {"layers_to_transform": [0], "layers_pattern": 7}, "layers_pattern"),
    (lora, {"layers_to_transform": [0], "layers_pattern": "("}, "layers_pattern"),
    (lora, {"exclude_modules": 5}, "exclude_modules"),
    (lora, {"exclude_modules": "(["}, "exclude_modules"),
    (lora, {"r": "2"}, "r"),
    (lora, {"r": True}, "r"),
    (lora, {"lora_alpha": "4"}, "lora_alpha"),
    (lora, {"lora_alpha": float("nan")}, "lora_alpha"),  # json writes NaN, Python's json reads it back
    (lora, {"use_rslora": "yes"}, "use_rslora"),
    (lora, {"use_dora": 1}, "use_dora"),
    (lora, {"peft_type": 5}, "peft_type"),
    (lora, {"peft_type": "ADALORA", "init_r": "2"}, "init_r"),
    (prompt, {"num_virtual_tokens": "4"}, "num_virtual_tokens"),
    (prompt, {"num_virtual_tokens": -4}, "num_virtual_tokens"),
    (prompt, {"num_virtual_tokens": 4.5}, "num_virtual_tokens"),
    (prompt, {"num_virtual_tokens": None}, "num_virtual_tokens"),
    (prompt, {"token_dim": "64"}, "token_dim"),
    (prompt, {"token_dim": 65}, "token_dim"),
    (prompt, {"num_layers": "2"}, "num_layers"),
    (prompt, {"num_transformer_submodules": 2}, "num_transformer_submodules"),
    (lambda p, **c: prompt(p, kind="PREFIX_TUNING", **c), {"token_dim": CFG.hidden_size}, "token_dim"),
    (lambda p, **c: prompt(p, kind="MULTITASK_PROMPT_TUNING", **c), {"num_tasks": 5}, "num_tasks"),
    (ia3, {"feedforward_modules": "("}, "feedforward_modules"),
    (ia3, {"feedforward_modules": 5}, "feedforward_modules"),
    (ia3, {"feedforward_modules": [["down_proj"]]}, "feedforward_modules"),
    (ia3, {"target_modules": 5}, "target_modules"),
    (ia3, {"layers_to_transform": 5.5}, "layers_to_transform"),
    (ia3, {"init_ia3_weights": "no"}, "init_ia3_weights"),
    (adaption, {"adapter_len": "3"}, "adapter_len"),
    (adaption, {"adapter_layers": 0}, "adapter_layers"),
    (adaption, {"adapter_len": None}, "adapter_len"),
    (adaption, {"target_modules": 5}, "target_modules"),
]


@pytest.mark.parametrize("write,override,field", MALFORMED,
                         ids=[f"{w.__name__}-{f}-{i}" for i, (w, _, f) in enumerate(MALFORMED)])
def test_malformed_config_fields_are_invalid_and_named(model, tmp_path, write, override, field):
    write(tmp_path / "bad", **override)
    m = manager(model, tmp_path)
    with pytest.raises(AdapterLoadError) as err:
        m.load("bad")
    assert err.value.reason == "invalid", err.value
    assert f"{field}:" in str(err.value), err.value
    assert m.get("bad") is None and m.infos() == []


def test_the_same_fields_when_well_formed_load(model, tmp_path):
    """The writers above are valid without their overrides (so each case tests only its one field)."""
    m = manager(model, tmp_path)
    lora(tmp_path / "lora", rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3.0}, layers_to_transform=[0, 1],
         layers_pattern="layers", exclude_modules=["model.layers.0.self_attn.k_proj"], use_rslora=True)
    prompt(tmp_path / "prompt")
    prompt(tmp_path / "prefix", kind="PREFIX_TUNING")
    prompt(tmp_path / "multitask", kind="MULTITASK_PROMPT_TUNING")
    ia3(tmp_path / "ia3", feedforward_modules="down_proj", layers_to_transform=[0, 1], init_ia3_weights=False)
    adaption(tmp_path / "adaption")
    for name in ("lora", "prompt", "prefix", "multitask", "ia3", "adaption"):
        assert m.load(name).host is not None, name
    assert m.entries["lora"].host.num_pages > 0


def _corrupt_weights(path: Path) -> None:
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


def _config_text(text: str):
    return lambda path: (path / "adapter_config.json").write_text(text)


def _tensors(fn):
    def edit(path: Path) -> None:
        from safetensors.torch import load_file

        t = {k: v.contiguous() for k, v in fn(load_file(str(path / "adapter_model.safetensors"))).items()}
        save_file(t, str(path / "adapter_model.safetensors"))
    return edit


def _poison(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[t.numel() // 2] = value
    return t


BROKEN_FILES = [  # (writer, edit of the written files, words the message must hold)
    (lora, _corrupt_weights, "not a valid safetensors file"),
    (lora, _config_text("[1, 2]"), "expected a JSON object, got list"),
    (lora, _config_text('"LORA"'), "expected a JSON object, got str"),
    (lora, _config_text('{"peft_type": "LORA", "r": 2,'), "not valid JSON"),
    (lora, _config_text("[" * 100_000 + "]" * 100_000), "not valid JSON"),  # too deep for the parser
    (lora, _tensors(lambda t: {k: v.to(torch.int32) for k, v in t.items()}), "must be floating-point"),
    (lora, _tensors(lambda t: {k: v[:, :1] if "lora_B" in k else v for k, v in t.items()}),
     "are not an (r, in) / (out, r) pair"),
    (lora, _tensors(lambda t: {k: v[0] if "lora_A" in k else v for k, v in t.items()}), "lora_A"),
    (lora, _tensors(lambda t: {k: _poison(v, float("nan")) if k.endswith("1.self_attn.v_proj.lora_B.weight") else v
                               for k, v in t.items()}), "model.layers.1.self_attn.v_proj has NaN or infinite weights"),
    (lora, _tensors(lambda t: {k: _poison(v, float("-inf")) if k.endswith("0.self_attn.q_proj.lora_A.weight") else v
                               for k, v in t.items()}), "model.layers.0.self_attn.q_proj has NaN or infinite weights"),
    (prompt, _tensors(lambda t: {"prompt_embeddings": t["prompt_embeddings"].to(torch.int64)}), "floating-point"),
    (prompt, _tensors(lambda t: {"prompt_embeddings": t["prompt_embeddings"].flatten()}), "prompt_embeddings"),
    (prompt, _tensors(lambda t: {"prompt_embeddings": t["prompt_embeddings"][:2]}), "num_virtual_tokens=4"),
    (ia3, _tensors(lambda t: {k: v.reshape(1, -1) if "k_proj" in k else v for k, v in t.items()}), "ia3_l"),
]


@pytest.mark.parametrize("write,edit,words", BROKEN_FILES, ids=[f"{i}-{w}" for i, (_, _, w) in enumerate(BROKEN_FILES)])
def test_broken_files_are_invalid(model, tmp_path, write, edit, words):
    edit(write(tmp_path / "bad"))
    m = manager(model, tmp_path)
    with pytest.raises(AdapterLoadError) as err:
        m.load("bad")
    assert err.value.reason == "invalid" and words in str(err.value), (err.value.reason, str(err.value))
    assert m.get("bad") is None


@pytest.mark.parametrize("path", ["/tmp/a\x00b", "\x00"])
def test_explicit_path_with_a_nul_byte_is_invalid(model, tmp_path, path):
    with pytest.raises(AdapterLoadError) as err:
        manager(model, tmp_path).load("x", path)
    assert err.value.reason == "invalid" and "path:" in str(err.value) and "NUL" in str(err.value)
    with pytest.raises(AdapterLoadError) as err:
        manager(model, tmp_path).load("a\x00b")
    assert err.value.reason == "invalid" and "adapter_id" in str(err.value)


def test_an_unexpected_loader_error_is_invalid_and_shared_by_concurrent_loads(model, tmp_path, monkeypatch, caplog):
    """Belt and braces: whatever a loader raises becomes AdapterLoadError("invalid") (never UNKNOWN), and a
    second request waiting for the same load gets that same reason (it used to get not_found)."""
    import server.adapters.kinds as mgr  # where the LoRA kind calls its loader

    lora(tmp_path / "x")
    started, go = threading.Event(), threading.Event()

    def broken(*args, **kw):
        started.set()
        go.wait(10)
        raise KeyError("boom")

    monkeypatch.setattr(mgr, "load_lora_adapter", broken)
    m = manager(model, tmp_path)
    errors = {}

    def load(name):
        try:
            m.load("x")
        except Exception as exc:  # noqa: BLE001 - the test looks at the type
            errors[name] = exc

    first = threading.Thread(target=load, args=("first",))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=load, args=("second",))
    second.start()
    second.join(0.3)  # now waiting for the first load's outcome
    go.set()
    first.join(10), second.join(10)
    for name in ("first", "second"):
        exc = errors[name]
        assert isinstance(exc, AdapterLoadError) and exc.reason == "invalid", (name, exc)
        assert "could not be read" in str(exc) and "boom" in str(exc), (name, exc)
    assert m.get("x") is None
    assert any("unexpected error" in r.getMessage() and r.exc_info for r in caplog.records)


# -- item 4: the host tier never drops what it just read; too small a budget is no_room --------------------------
def _four_and_a_big_one(model, tmp_path):
    """Four adapters of 64 KiB and one of 128 KiB (fp32 pages)."""
    small = [lora(tmp_path / f"s{i}", rank=8, targets=ALL_LINEAR, seed=i) for i in range(4)]
    lora(tmp_path / "big", rank=16, targets=ALL_LINEAR, seed=9)
    probe = manager(model, tmp_path)
    sizes = {p.name: probe.load(p.name).nbytes for p in [*small, tmp_path / "big"]}
    return [p.name for p in small], sizes


def test_fifth_adapter_is_kept_when_the_four_before_it_are_device_resident(model, tmp_path, caplog):
    """The reported case: four adapters resident on the device (served, unpinned), a fifth read from disk
    over the host budget. It used to be the only adapter the host tier could drop, so it was dropped right
    after it was read and every request for it got NOT_FOUND "is not loaded"."""
    small, sizes = _four_and_a_big_one(model, tmp_path)
    # as with --adapter-memory 32MiB --adapter-host-memory 48MiB: the pool holds the four, the host tier
    # is larger than the pool but one byte short of holding all five
    device = sum(sizes[n] for n in small) + (4 << 10)
    host = sum(sizes.values()) - 1
    assert device < host and sizes["big"] < device
    m = manager(model, tmp_path, device=device, host=host)
    for name in small:
        m.load(name)
        assert m.make_resident(name)  # a request ran with it, then let go
    assert all(m.entries[n].residency == "device" for n in small)
    with caplog.at_level(logging.INFO, logger="tessera.adapters"):
        e = m.load("big")
    assert e.host is not None and not any("big dropped" in r.getMessage() for r in caplog.records)
    assert m.acquire("big").entry is e and e.refs == 1
    assert sum(x.nbytes for x in m.entries.values() if x.host is not None) <= host
    # the least recently used one made room (its device pages went first); the others stay where they were
    assert m.entries["s0"].residency == "disk" and m.pool.num_used == sum(
        x.host.num_pages for x in m.entries.values() if x.device is not None)
    assert [m.entries[n].residency for n in small[1:]] == ["device"] * 3
    assert m.make_resident("big")


def test_host_budget_too_small_for_the_new_adapter_is_no_room(model, tmp_path):
    small, sizes = _four_and_a_big_one(model, tmp_path)
    held = sum(sizes[n] for n in small)
    m = manager(model, tmp_path, device=held + (4 << 10), host=held + sizes["big"] - 1)
    for name in small:
        m.load(name)
        m.acquire(name)  # requests hold all four: nothing can be dropped
    with pytest.raises(AdapterLoadError) as err:
        m.load("big")
    msg = str(err.value)
    assert err.value.reason == "no_room" and "--adapter-host-memory" in msg and "by at least 0.0 KiB" not in msg
    assert "by at least" in msg and "in use by requests" in msg
    assert m.get("big") is None and "big" not in m.entries  # not half-registered
    assert all(m.entries[n].host is not None for n in small)  # nothing was dropped for nothing
    for name in small:
        m.release(name)
    assert m.load("big").host is not None  # now the idle ones make room


def test_adapter_larger_than_the_whole_host_budget_is_no_room(model, tmp_path):
    _, sizes = _four_and_a_big_one(model, tmp_path)
    m = manager(model, tmp_path, host=sizes["big"] // 2)
    with pytest.raises(AdapterLoadError) as err:
        m.load("big")
    assert err.value.reason == "no_room" and "--adapter-host-memory" in str(err.value)
    assert m.get("big") is None


def test_an_adapter_dropped_between_its_load_and_acquire_is_read_again(model, tmp_path):
    """On-demand Generate: load(id), then make_sequence -> acquire(id). A concurrent load of another
    adapter may drop the first from host memory in between; acquire reads it again instead of NOT_FOUND."""
    small, sizes = _four_and_a_big_one(model, tmp_path)
    m = manager(model, tmp_path, host=sizes["s0"] + sizes["big"])
    m.load("s0")
    m.load("s1")
    m.load("big")  # s0 (least recently used, idle) makes room
    assert m.entries["s0"].host is None and m.needs_load("s0")
    e = m.acquire("s0").entry
    assert e.host is not None and e.refs == 1
    held = m.load("s1", hold=True)  # load with a reference held: nothing can drop it before it is used
    assert held.refs == 1 and held.host is not None
    assert m.entries["s0"].host is not None  # in use by a request: never dropped
    m.release("s0"), m.release("s1")
    assert m.entries["s0"].refs == 0 and m.entries["s1"].refs == 0


# -- item 5: a prefix that can never fit --adapter-kv-fraction is refused at load ---------------------------------
def tiny_engine(tmp_path: Path, num_blocks: int, fraction: float) -> LLMEngine:
    bytes_per_block = CFG.num_hidden_layers * 2 * 16 * KV_DIM * 4  # fp32, block_size 16
    cfg = EngineConfig(adapter_root=str(tmp_path), kv_cache_memory=num_blocks * bytes_per_block,
                       adapter_kv_fraction=fraction, device="cpu", quantize="none")
    return LLMEngine(cfg, tiny_loaded())


@pytest.mark.parametrize("kind", ["PREFIX_TUNING", "PROMPT_TUNING"])
def test_prefix_over_the_kv_budget_is_refused_at_load(tmp_path, kind):
    engine = tiny_engine(tmp_path, num_blocks=44, fraction=0.25)  # budget: 11 blocks of 16 tokens
    assert engine.blocks.allocator.num_blocks == 44 and engine.adapter_kv_budget == 11
    prompt(tmp_path / "big", nvt=224, kind=kind)  # 14 blocks
    prompt(tmp_path / "fits", nvt=176, kind=kind)  # 11 blocks: the whole budget
    with pytest.raises(AdapterLoadError) as err:
        engine.adapters.load("big")
    msg = str(err.value)
    assert err.value.reason == "no_room", msg
    assert "needs 14 KV blocks for its 224 virtual tokens" in msg and "allows 11 of the 44-block cache" in msg
    assert "--adapter-kv-fraction" in msg and "--kv-cache-memory" in msg
    assert engine.adapters.get("big") is None
    assert engine.adapters.load("fits").host is not None




# -- the packer: one copy from the file into the host buffer, converted on the way -------------------------------
@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [4, 3])  # scale 2 (a power of two: exact in any dtype) and 1.5
def test_packed_buffer_equals_the_file_converted_once(model, tmp_path, file_dtype, pool_dtype, alpha):
    """Whatever the file's and the pool's dtypes, each packed A row is the file's A in the pool's dtype and each
    Bt row is scale * B rounded once to it (computed in fp32)."""
    path = lora(tmp_path / "a", rank=2, targets=ALL_LINEAR, lora_alpha=alpha)
    _tensors(lambda t: {k: v.to(file_dtype) for k, v in t.items()})(path)
    from safetensors.torch import load_file
    stored = load_file(str(path / "adapter_model.safetensors"))
    m = AdapterManager(model, adapter_root=tmp_path, device_memory=8 << 20, host_memory=64 << 20, max_lora_rank=64,
                       lora_dtype=pool_dtype)
    packed = m.load("a").host
    assert packed.flat.dtype == pool_dtype
    page = m.pool.page_size
    scale = alpha / 2
    checked = 0
    for (layer, first), g in packed.groups.items():
        a_cat = packed.flat[g.a_pages[0] * page:g.a_pages[1] * page].view(g.rank, g.in_features)
        for s in g.slices:
            key = f"base_model.model.model.layers.{layer}.{'self_attn' if s.name.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{s.name}"
            want_a = stored[f"{key}.lora_A.weight"].to(pool_dtype)
            want_bt = (stored[f"{key}.lora_B.weight"].float().t() * scale).to(pool_dtype)
            bt = packed.flat[s.bt_pages[0] * page:s.bt_pages[1] * page].view(s.r1 - s.r0, s.out_features)
            assert torch.equal(a_cat[s.r0:s.r1], want_a), (key, "A")
            assert torch.equal(bt, want_bt), (key, "Bt")
            checked += 1
    assert checked == len(ALL_LINEAR) * CFG.num_hidden_layers


def test_weights_that_overflow_a_float16_pool_are_invalid(model, tmp_path):
    """Finite in the file (fp32), infinite once rounded to the fp16 pool: refused, naming the pool's dtype."""
    path = lora(tmp_path / "big")
    _tensors(lambda t: {k: v * 1e6 if "lora_B" in k else v for k, v in t.items()})(path)
    m = AdapterManager(model, adapter_root=tmp_path, device_memory=8 << 20, host_memory=64 << 20, max_lora_rank=64,
                       lora_dtype=torch.float16)
    with pytest.raises(AdapterLoadError) as err:
        m.load("big")
    assert err.value.reason == "invalid" and "overflow float16" in str(err.value), str(err.value)
    assert m.get("big") is None
    assert manager(model, tmp_path).load("big").host is not None  # the fp32 pool holds it
