"""Prefix (with/without projection), prompt (text init), P-tuning, multitask prompt tuning, IA3 and
LLaMA-Adapter adapters made by PEFT on the real SmolLM2, requested concurrently with LoRA adapters and
the base model through the gRPC server: greedy tokens equal PEFT's generate for each adapter alone.
A prefix adapter used by 16 requests holds its KV blocks once; unloading frees every block."""
from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from proto import tessera_pb2 as pb
from server.config import EngineConfig
from server.engine.request import GenerateRequest, SamplingParams
from tests import smollm2
from tests import peft_adapters as lora_oracle
from tests import peft_prompt_adapters as oracle
from tests.server_proc import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ADMIN = [("authorization", "Bearer adm")]
N_NEW = 10
PROMPTS = ["The three most important things about", "def fibonacci(n):\n"]
KINDS = {"prefix": "prefix", "prefix-proj": "prefix", "prompt-text": "prompt", "p-tuning": "p_tuning",
         "multitask": "multitask", "ia3": "ia3", "ia3-attn": "ia3", "adaption": "adaption_prompt"}
LORAS = ("r8-all-linear", "dora-r8")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-root")
    for name in KINDS:
        shutil.copytree(oracle.build(name), root / name)
    for name in LORAS:
        shutil.copytree(lora_oracle.build(name), root / name)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, root):
    srv = ServerProcess(tmp_path_factory.mktemp("srv"), "--adapter-root", str(root), "--admin-token", "adm",
                        "--block-size", "4")
    yield srv
    assert srv.stop() == 0


def _gen(stub, adapter: str | None, ids: list[int], task: int | None = None) -> list[int]:
    req = pb.GenerateRequest(prompt_token_ids=ids, adapter_id=adapter or "", max_new_tokens=N_NEW)
    if task is not None:
        req.task_id = task
    return [t for m in stub.Generate(req, timeout=600) for t in m.token_ids]


def test_every_kind_in_one_mixed_batch_equals_peft(server):
    from tests.oracle import hf_smollm2_dir
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_smollm2_dir())
    work = []
    for p in PROMPTS:
        ids = tok(p).input_ids
        work += [(name, ids, None) for name in KINDS if name != "multitask"]
        work += [("multitask", ids, t) for t in (0, 1, 2)]
        work += [(name, ids, None) for name in LORAS] + [(None, ids, None)]
    with ThreadPoolExecutor(len(work)) as pool:  # all at once: they share the server's batches
        got = list(pool.map(lambda w: _gen(server.stub, *w), work))
    for (name, ids, task), tokens in zip(work, got):
        if name in LORAS:
            want = lora_oracle.peft_greedy(name, tuple(ids), N_NEW)
        else:
            want = oracle.peft_greedy(name, tuple(ids), N_NEW, task)
        assert tokens == want, f"{name} task {task}"
    listed = {a.adapter_id: a.kind for a in server.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=ADMIN).adapters}
    for name, kind in KINDS.items():
        assert listed[name] == kind
    m = server.metrics()
    assert m['tessera_adapters_loaded{kind="prefix"}'] == 2 and m['tessera_adapters_loaded{kind="ia3"}'] == 2
    assert m["tessera_adapter_kv_blocks"] > 0  # the prompt-learning adapters' shared prefixes
    for name in KINDS:
        server.stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=name), metadata=ADMIN)
    _gen(server.stub, None, [1, 2, 3])  # a step runs: prefixes of unloaded adapters are freed
    m = server.metrics()
    assert m["tessera_adapter_kv_blocks"] == 0 and m["tessera_kv_cache_blocks_used"] == 0


def test_bad_task_ids_are_invalid_argument(server):
    import grpc

    for adapter, task in (("multitask", 3), ("r8-all-linear", 0), ("", 1)):
        with pytest.raises(grpc.RpcError) as e:
            _gen(server.stub, adapter, [1, 2, 3], task)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (adapter, task)


def test_prefix_kv_is_shared_through_the_prefix_cache(root):
    """Engine level, exact block accounting: a prefix adapter with nvt = 10 and blocks of 4. The first request
    computes (writes) the virtual tokens and its prompt; 15 later ones with the same prompt start on its 4 full
    blocks (10 virtual + 6 prompt positions) and each holds one block of its own."""
    engine = smollm2.engine(EngineConfig(adapter_root=str(root), block_size=4, max_num_seqs=32))
    engine.adapters.load("prefix")
    nvt = engine.adapters.adapter("prefix").num_virtual_tokens
    assert nvt == 10
    prompt = [1, 504, 2988, 314, 253, 3385, 282]  # 7 tokens: 10 + 7 = 17 cached positions -> 5 blocks per request

    def add():
        s = engine.make_sequence(GenerateRequest(prompt_token_ids=prompt, adapter_id="prefix",
                                                 sampling=SamplingParams(max_new_tokens=3)))
        engine.add(s)
        return s

    outs: dict[str, list[int]] = {}

    def step():
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.token_ids)

    first = add()
    step()  # prefills the first: its 4 full blocks are registered
    seqs = [first] + [add() for _ in range(15)]
    step()
    shared = first.block_table[:4]
    assert all(s.block_table[:4] == shared and len(s.block_table) == 5 for s in seqs)
    assert [engine.blocks.allocator.ref_counts[b] for b in shared] == [16] * 4
    assert engine.blocks.allocator.num_used == 4 + 16  # vs 16 * 5 = 80 without sharing
    assert len(engine.blocks.allocator.virtual) == 3  # blocks holding virtual tokens: positions 0-11
    assert engine.blocks.prefix_hits == 15 * 16
    while engine.has_work():
        step()
    assert len(outs) == 16 and len({tuple(v) for v in outs.values()}) == 1  # the same tokens for all 16
    assert engine.blocks.allocator.num_used == 0 and engine.blocks.allocator.num_cached >= 4  # idle, still cached
    engine.adapters.unload("prefix")
    engine.step()
    assert engine.blocks.allocator.num_cached == 0 and not engine.blocks.allocator.virtual  # its KV is forgotten


def test_unserved_kinds_are_refused_by_name(tmp_path):
    from server.errors import AdapterLoadError
    from loader.adapters.lora import read_adapter_config

    hub = tmp_path / "bottleneck"
    hub.mkdir()
    (hub / "adapter_config.json").write_text('{"config": {"architecture": "bottleneck", "reduction_factor": 16}, '
                                             '"hidden_size": 576, "name": "x"}')
    (hub / "pytorch_adapter.bin").write_bytes(b"not read")
    with pytest.raises(AdapterLoadError, match=r"adapter-transformers .*\(bottleneck\) is not served"):
        read_adapter_config(hub)
    for kind in ("LOKR", "OFT", "VERA"):
        d = tmp_path / kind
        d.mkdir()
        (d / "adapter_config.json").write_text(f'{{"peft_type": "{kind}"}}')
        with pytest.raises(AdapterLoadError, match=f"{kind} adapters are not served"):
            read_adapter_config(d)


def test_max_loras_bounds_lora_adapters_only(root):
    """--max-loras 1: two LoRA adapters take turns, while prefix and IA3 requests run beside them."""
    engine = smollm2.engine(EngineConfig(adapter_root=str(root), max_loras=1))
    work = ["r8-all-linear", "dora-r8", "prefix", "ia3"]
    ids = [1, 504, 2988, 314, 253, 3385]
    seqs = {}
    for name in work:
        engine.adapters.load(name)
        s = engine.make_sequence(GenerateRequest(prompt_token_ids=ids, adapter_id=name,
                                                 sampling=SamplingParams(max_new_tokens=N_NEW)))
        engine.add(s)
        seqs[name] = s
    out = {}
    for o in engine.step():
        out.setdefault(o.request_id, []).extend(o.token_ids)
    running = {s.adapter_id for s in engine.scheduler.running}
    assert running == {"r8-all-linear", "prefix", "ia3"}  # dora-r8 waits for the LoRA slot
    assert engine.prefetcher.wait_idle()  # meanwhile the prefetch thread puts it into device pages
    assert engine.adapters.get("dora-r8").device is not None and engine.adapters.num_prefetched == 1
    while engine.has_work():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    for name, s in seqs.items():
        want = (lora_oracle.peft_greedy(name, tuple(ids), N_NEW) if name in LORAS
                else oracle.peft_greedy(name, tuple(ids), N_NEW))
        assert out[s.request_id] == want, name


def test_reloading_an_id_from_another_path_serves_the_new_prefix(root):
    engine = smollm2.engine(EngineConfig(adapter_root=str(root)))
    ids = [1, 504, 2988, 314, 253, 3385]

    def generate():
        s = engine.make_sequence(GenerateRequest(prompt_token_ids=ids, adapter_id="x",
                                                 sampling=SamplingParams(max_new_tokens=N_NEW)))
        engine.add(s)
        out = []
        while engine.has_work():
            out += [t for o in engine.step() for t in o.token_ids]
        return out

    engine.adapters.load("x", root / "prefix")
    assert generate() == oracle.peft_greedy("prefix", tuple(ids), N_NEW)
    engine.adapters.unload("x")
    engine.adapters.load("x", root / "prefix-proj")  # same id, other adapter: its old KV must not be reused
    assert generate() == oracle.peft_greedy("prefix-proj", tuple(ids), N_NEW)
    engine.adapters.unload("x")
    engine.step()
    assert engine.blocks.allocator.num_used == 0
