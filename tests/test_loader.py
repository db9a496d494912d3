"""loader/: the embedded GGUF, tiny HF directories and tiny GGUF files load bit-exactly as transformers loads
them; every broken input gives one ModelLoadError naming the file and the problem."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from loader.base import ModelLoadError, default_model_path, load_base_model
from loader.config import ModelConfig
from loader.tokenizer_cache import cache_dir, gguf_tokenizer
from tests.oracle import CACHE

Q = gguf.GGMLQuantizationType
TEXTS = ["Hello, world!", "naïve café — 世界 🙂 שלום", "  two spaces\n\ttab", "<|im_start|>user\nHi<|im_end|>"]
MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Où est le café? 🙂"}]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def _tiny_hf(arch: str, vocab: int = 256, tie: bool = False, **extra):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type=arch, vocab_size=vocab, tie_word_embeddings=tie, **TINY, **extra)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # biases and norms start as 0 / 1: randomize them so that they are checked too
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(0, 0.5)
    return model


def _render(tok) -> str:
    return tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def _broken(match: str, path: Path | str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        load_base_model(str(path))


# -- the embedded SmolLM2 GGUF against transformers' own GGUF load -----------------------------------------
@pytest.fixture(scope="module")
def embedded():
    with pytest.MonkeyPatch.context() as mp:  # a persistent cache: the ~8 s tokenizer conversion happens once
        mp.setenv("TESSERA_CACHE", str(CACHE / "tessera"))
        return load_base_model()


@pytest.fixture(scope="module")
def hf_embedded():
    path = Path(default_model_path())
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


def test_embedded_weights_equal_transformers(embedded, hf_embedded):
    ref = hf_embedded.state_dict()
    assert embedded.source == default_model_path() and embedded.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert set(embedded.weights) == set(ref) - {"lm_head.weight"}  # tied: no lm_head
    for name, tensor in embedded.weights.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, ref[name]), name
    assert torch.equal(ref["lm_head.weight"], embedded.weights["model.embed_tokens.weight"])


def test_embedded_config_matches_transformers(embedded, hf_embedded):
    hf, cfg = hf_embedded.config, embedded.config
    assert (cfg.architecture, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.max_position_embeddings) == (
        hf.model_type, hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers,
        hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim, hf.max_position_embeddings) == (
        "llama", 49152, 576, 1536, 30, 9, 3, 64, 8192)
    assert cfg.rms_norm_eps == hf.rms_norm_eps and cfg.rope_theta == hf.rope_parameters["rope_theta"] == 1e5
    assert cfg.rope_scaling is None and hf.rope_parameters["rope_type"] == "default"
    assert (cfg.tie_word_embeddings, cfg.attention_bias, cfg.mlp_bias) == (True, False, False)
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (hf.bos_token_id, [hf.eos_token_id],
                                                                       hf.pad_token_id) == (1, [2], 2)
    assert ModelConfig.from_hf_dict(hf.to_dict(), name=cfg.name) == cfg


def test_embedded_tokenizer_matches_transformers_and_is_cached(embedded, monkeypatch, caplog):
    path = Path(default_model_path())
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    monkeypatch.setenv("TESSERA_CACHE", str(CACHE / "tessera"))
    assert (cache_dir(path) / "tokenizer.json").is_file()
    with caplog.at_level(logging.INFO, logger="tessera.loader"):
        cached = gguf_tokenizer(path)
    assert "from the cache" in caplog.text
    for tok in (embedded.tokenizer, cached):
        assert tok(TEXTS).input_ids == ref(TEXTS).input_ids
        assert [tok.decode(i) for i in ref(TEXTS).input_ids] == TEXTS
        assert _render(tok) == _render(ref) and "<|im_start|>assistant\n" in _render(ref)
    assert embedded.chat_template == ref.chat_template is not None


# -- Hugging Face directories ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_files(embedded, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    embedded.tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("arch,tie,shard", [("llama", False, None), ("llama", True, "100KB"),
                                            ("qwen2", False, None), ("qwen2", False, "100KB"),
                                            ("mistral", True, None)])
def test_hf_dir_loads_exactly(arch, tie, shard, tmp_path, embedded, tokenizer_files):
    model = _tiny_hf(arch, vocab=49152, tie=tie)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size=shard or "1GB")
    shutil.copytree(tokenizer_files, tmp_path, dirs_exist_ok=True)
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard)
    assert len(list(tmp_path.glob("*.safetensors"))) > (2 if shard else 0)
    loaded = load_base_model(str(tmp_path))
    ref = model.state_dict()
    assert set(loaded.weights) == set(ref) - ({"lm_head.weight"} if tie else set())
    for name, tensor in loaded.weights.items():
        assert torch.equal(tensor, ref[name]), name
    assert loaded.config == ModelConfig.from_hf_dict(model.config.to_dict(), name=tmp_path.name)
    assert loaded.config.attention_bias == (arch == "qwen2") and loaded.config.dtype == "float32"
    assert loaded.tokenizer(TEXTS).input_ids == embedded.tokenizer(TEXTS).input_ids
    assert loaded.chat_template == embedded.chat_template and _render(loaded.tokenizer) == _render(embedded.tokenizer)


def test_hf_dir_dtype_names_and_generation_config(tmp_path, tokenizer_files):
    model = _tiny_hf("llama", tie=True).to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True)
    shutil.copytree(tokenizer_files, tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    # a bare LlamaModel checkpoint: no "model." prefix
    state = load_file(tmp_path / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in state.items()}, tmp_path / "model.safetensors")
    kept = load_base_model(str(tmp_path))
    assert kept.config.dtype == "bfloat16" and kept.config.eos_token_ids == [2, 7]
    as_fp32 = load_base_model(str(tmp_path), dtype=torch.float32)
    for name, ref in model.state_dict().items():
        if name != "lm_head.weight":
            assert kept.weights[name].dtype == torch.bfloat16 and torch.equal(kept.weights[name], ref), name
            assert torch.equal(as_fp32.weights[name], ref.float()), name


# -- ModelConfig -----------------------------------------------------------------------------------------------
HF_CONFIGS = {
    "llama": dict(model_type="llama", rope_theta=10000.0),
    "llama3-rope": dict(model_type="llama", rope_theta=5e5, eos_token_id=[2, 3], rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "linear-4.x-style": dict(model_type="llama", rope_scaling={"type": "linear", "factor": 2.0}, attention_bias=True),
    "qwen2-yarn": dict(model_type="qwen2", tie_word_embeddings=True, rope_theta=1e6,
                       rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
    "mistral-head-dim": dict(model_type="mistral", head_dim=32, pad_token_id=0),
}


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_config_round_trips_through_transformers(name):
    raw = {"vocab_size": 256, **TINY, **HF_CONFIGS[name]}
    hf = AutoConfig.for_model(**raw)
    cfg = ModelConfig.from_hf_dict(hf.to_dict(), name=name)
    assert ModelConfig.from_hf_dict(raw, name=name) == cfg  # the file as written == transformers' reading of it
    rebuilt = AutoConfig.for_model(**cfg.to_hf_dict())
    for key in ("model_type", "vocab_size", *TINY, "rope_parameters", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias", "head_dim"):
        if hasattr(hf, key):  # Qwen2Config has no head_dim / attention_bias (always hidden // heads / biased)
            assert getattr(rebuilt, key) == getattr(hf, key), key
    assert ModelConfig.from_hf_dict(rebuilt.to_dict(), name=name) == cfg


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_config_defaults_are_transformers_defaults(arch):
    minimal = dict(model_type=arch, vocab_size=256, hidden_size=512, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=64)
    cfg, hf = ModelConfig.from_hf_dict(minimal, name=arch), AutoConfig.for_model(**minimal)
    assert (cfg.max_position_embeddings, cfg.rms_norm_eps, cfg.rope_theta, cfg.num_key_value_heads,
            cfg.bos_token_id, cfg.eos_token_ids) == (
        hf.max_position_embeddings, hf.rms_norm_eps, hf.rope_parameters["rope_theta"], hf.num_key_value_heads,
        hf.bos_token_id, [] if hf.eos_token_id is None else [hf.eos_token_id])
    assert cfg.attention_bias == (arch == "qwen2")


def test_config_validation_names_the_problem():
    good = ModelConfig.from_hf_dict({"model_type": "llama", "vocab_size": 256, **TINY}, name="x")
    for change, message in [(dict(architecture="gpt2"), "'gpt2' is not supported; supported: llama, mistral, qwen2"),
                            (dict(num_key_value_heads=3), "num_attention_heads 4 is not divisible by num_key_v"),
                            (dict(hidden_size=0), "hidden_size must be a positive integer, got 0"),
                            (dict(hidden_size=66), "hidden_size 66 is not divisible by num_attention_heads 4"),
                            (dict(eos_token_ids=[300]), r"eos_token_ids 300 is outside the vocabulary \[0, 256\)"),
                            (dict(dtype="int8"), "dtype must be one of float32, bfloat16, float16")]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(good, **change)


# -- broken inputs: one ModelLoadError naming the file and the problem ----------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama saved whole and sharded (no tokenizer: every error comes before it is needed)."""
    out = {"whole": tmp_path_factory.mktemp("whole"), "sharded": tmp_path_factory.mktemp("sharded")}
    model = _tiny_hf("llama")
    model.save_pretrained(out["whole"], safe_serialization=True)
    model.save_pretrained(out["sharded"], safe_serialization=True, max_shard_size="60KB")
    return out


class _Trap:
    """Unpickling this creates the file `path` (as a malicious pickle would run code)."""
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_only_dir_is_refused_without_unpickling(tmp_path, small):
    shutil.copy(small["whole"] / "config.json", tmp_path)
    marker = tmp_path / "unpickled"
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(str(marker))))
    _broken(r"only pickled weights \(pytorch_model\.bin\); pickles are never loaded.*to safetensors", tmp_path)
    assert not marker.exists()
    pickle.loads((tmp_path / "pytorch_model.bin").read_bytes()).close()  # the trap is real
    assert marker.exists()


def test_broken_hf_dirs(tmp_path, small):
    def fresh(kind: str) -> Path:
        d = tmp_path / f"{kind}-{len(list(tmp_path.iterdir()))}"
        return Path(shutil.copytree(small[kind], d))

    d = fresh("whole")
    (d / "config.json").unlink()
    _broken(f"{re.escape(str(d))} has no config.json", d)
    d = fresh("whole")
    (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "gpt2"}))
    _broken(r"config\.json: model_type 'gpt2' is not supported; supported: llama, mistral, qwen2", d)
    d = fresh("whole")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _broken(f"{re.escape(str(f))}: not a valid safetensors file .*incomplete metadata", d)
    f.write_bytes((16).to_bytes(8, "little") + b"{not json at all" + b"\0" * 64)
    _broken(f"{re.escape(str(f))}: not a valid safetensors file .*invalid JSON in header", d)
    d = fresh("sharded")
    shard = sorted(d.glob("*.safetensors"))[1]
    shard.unlink()
    _broken(f"index.json names shard\\(s\\) that are not in .*: {shard.name}", d)
    d = fresh("whole")
    state = load_file(d / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}, d / "model.safetensors")
    _broken(r"model\.safetensors\): 1 tensor\(s\) the config requires are missing: model\.layers\.1\.mlp\.up_proj",
            d)
    save_file({**state, "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}, d / "model.safetensors")
    _broken(r"model\.safetensors: tensor model\.layers\.0\.self_attn\.k_proj\.weight has shape \[64, 64\], "
            r"the config implies \[32, 64\]", d)
    _broken("no such file or directory", tmp_path / "nowhere")
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 this is a zip, not GGUF" * 10)
    _broken(r"fake\.gguf: not a valid GGUF file", tmp_path / "fake.gguf")


# -- tiny GGUF files written as llama.cpp writes them --------------------------------------------------------
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
_GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_TOKENS = [bytes_to_unicode()[b] for b in range(256)] + ["Ġt", "<s>", "</s>"]  # byte-level BPE, 259 ids


def _gguf_name(hf: str) -> str:
    if hf in _GGUF_TOP:
        return _GGUF_TOP[hf]
    parts = hf.split(".")  # model.layers.<i>.<module>[.<proj>].<weight|bias>
    return f"blk.{parts[2]}.{_GGUF_LAYER['.'.join(parts[3:-1])]}.{parts[-1]}"


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, model, qtype_of) -> dict[str, torch.Tensor]:
    """Write `model` with tensor types qtype_of(hf_name); -> what each tensor must load as (quantization error
    included, permutation undone)."""
    c, arch = model.config, model.config.model_type
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny"), w.add_block_count(c.num_hidden_layers), w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size), w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads), w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"]), w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default"), w.add_token_list(_TOKENS)
    w.add_token_types([1] * 257 + [3, 3]), w.add_token_merges(["Ġ t"]), w.add_bos_token_id(257)
    w.add_eos_token_id(258), w.add_chat_template("{% for m in messages %}{{ m['content'] }}</s>{% endfor %}")
    expected = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        qtype, data = qtype_of(name), tensor.numpy()
        if qtype == Q.F64:  # a type gguf cannot dequantize
            w.add_tensor(_gguf_name(name), data.astype(np.float64))
            continue
        expected[name] = torch.from_numpy(np.array(dequantize(quantize(data, qtype), qtype)).reshape(data.shape))
        heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}.get(name.split(".")[-2])
        if arch == "llama" and heads:
            data = _llama_cpp_permute(data, heads)
        w.add_tensor(_gguf_name(name), quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return expected


@pytest.mark.parametrize("arch,tie,matrix,embed", [("llama", False, Q.Q4_0, Q.Q8_0), ("llama", True, Q.BF16, Q.F16),
                                                  ("qwen2", False, Q.Q8_0, Q.Q4_1), ("qwen2", True, Q.F16, Q.F32)],
                         ids=lambda v: v.name if isinstance(v, Q) else str(v))
def test_gguf_loads_like_transformers(arch, tie, matrix, embed, tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "cache"))
    model = _tiny_hf(arch, vocab=len(_TOKENS), tie=tie)

    def qtype_of(name: str) -> Q:
        return Q.F32 if name.endswith("bias") or "norm" in name else embed if "embed" in name else matrix

    expected = _write_gguf(tmp_path / "tiny.gguf", model, qtype_of)
    loaded = load_base_model(str(tmp_path / "tiny.gguf"))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).state_dict()
    assert set(loaded.weights) == set(expected)
    for name, tensor in loaded.weights.items():
        assert torch.equal(tensor, expected[name]) and torch.equal(tensor, ref[name]), name
    eps = float(np.float32(model.config.rms_norm_eps))  # GGUF stores it as float32
    assert loaded.config == dataclasses.replace(ModelConfig.from_hf_dict(model.config.to_dict(), name="tiny"),
                                                bos_token_id=257, eos_token_ids=[258], rms_norm_eps=eps)
    assert loaded.tokenizer(TEXTS).input_ids[1][:3] == [110, 97, 195] and loaded.chat_template.endswith("endfor %}")


def test_gguf_tokenizer_cache_is_keyed_by_file_and_round_trips(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, _tiny_hf("llama", vocab=len(_TOKENS), tie=True), lambda n: Q.F32)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    with caplog.at_level(logging.INFO, logger="tessera.loader"):
        first = load_base_model(str(path)).tokenizer
        assert "converted the tokenizer" in caplog.text and "cached the tokenizer" in caplog.text
        caplog.clear()
        second = load_base_model(str(path)).tokenizer
        assert "from the cache" in caplog.text and "converted" not in caplog.text
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a changed file
        caplog.clear()
        load_base_model(str(path))
        assert "converted the tokenizer" in caplog.text
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 2
    for tok in (first, second):
        assert tok(TEXTS).input_ids == ref(TEXTS).input_ids and _render(tok) == _render(ref)


def test_gguf_with_a_type_we_cannot_dequantize_names_tensor_and_type(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "cache"))
    _write_gguf(tmp_path / "f64.gguf", _tiny_hf("llama", vocab=len(_TOKENS)),
                lambda n: Q.F64 if n == "model.norm.weight" else Q.F32)
    _broken(r"tensor output_norm\.weight in .*f64\.gguf has GGML type F64", tmp_path / "f64.gguf")
