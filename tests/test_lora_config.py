"""adapter_config.json parsing: module matching and scaling agree with PEFT's own functions;
unsupported fields are all reported at once; adapter ids cannot escape the root."""
from __future__ import annotations

import math
import os

import pytest
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from loader.adapters.adapter_config import LINEAR_MODULES, LoraAdapterConfig
from server.errors import AdapterLoadError
from loader.adapters.adapter_paths import check_adapter_id, resolve_adapter_dir

PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
NAMES = [f"model.layers.{i}.{PARENT[m]}.{m}" for i in range(12) for m in LINEAR_MODULES]


def saved(cfg) -> dict:
    """The dict PEFT writes to adapter_config.json."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cfg.save_pretrained(d)
        with open(os.path.join(d, "adapter_config.json")) as f:
            return json.load(f)


@pytest.mark.parametrize("kw", [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=r".*\.(q_proj|down_proj)"),
    dict(target_modules=["k_proj", "up_proj"], layers_to_transform=[0, 3, 11]),
    dict(target_modules=["o_proj"], layers_to_transform=5, layers_pattern="layers"),
    dict(target_modules=["q_proj", "model.layers.2.mlp.down_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]),
    dict(target_modules=["gate_proj", "up_proj", "down_proj"], exclude_modules=r".*\.1\d\..*"),
])
def test_targets_match_peft(kw):
    peft_cfg = LoraConfig(r=8, lora_alpha=16, **kw)
    ours = LoraAdapterConfig.from_dict(saved(peft_cfg))
    for name in NAMES:
        want = check_target_module_exists(peft_cfg, name)
        want = bool(want) and type(want).__name__ != "_ExcludedModule"
        assert ours.targets(name) == want, name


def test_scaling_rules():
    cfg = LoraAdapterConfig.from_dict(saved(LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "o_proj", "v_proj"],
        rank_pattern={"o_proj": 16, "model.layers.3.self_attn.q_proj": 4}, alpha_pattern={"v_proj": 32})))
    assert cfg.rank_of("model.layers.0.self_attn.o_proj") == 16
    assert cfg.rank_of("model.layers.3.self_attn.q_proj") == 4
    assert cfg.rank_of("model.layers.13.self_attn.q_proj") == 8  # the pattern is anchored at a dot
    assert cfg.scale_of("model.layers.0.self_attn.v_proj", 8) == 4.0
    assert cfg.scale_of("model.layers.0.self_attn.o_proj", 16) == 1.0
    rs = LoraAdapterConfig.from_dict(saved(LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj"])))
    assert rs.scale_of("model.layers.0.self_attn.q_proj", 16) == 8 / math.sqrt(16)
    all_linear = LoraAdapterConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": "all-linear"})
    assert all(all_linear.targets(n) for n in NAMES)


def test_every_unsupported_field_reported_at_once():
    d = saved(LoraConfig(r=8, target_modules=["q_proj"], bias="all", modules_to_save=["lm_head"]))
    d["fancy_new_option"] = 3
    with pytest.raises(AdapterLoadError) as err:
        LoraAdapterConfig.from_dict(d)
    msg = str(err.value)
    assert "bias='all'" in msg and "modules_to_save" in msg and "fancy_new_option" in msg
    assert err.value.reason == "unsupported"


@pytest.mark.parametrize("bad", ["../etc", "/abs", "a/../../b", "a\x00b", "", "x" * 300, ".hidden", "a//b", "a/./b"])
def test_bad_adapter_ids(bad):
    with pytest.raises(AdapterLoadError) as err:
        check_adapter_id(bad)
    assert err.value.reason == "invalid"


def test_symlink_out_of_root_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "escape")
    (root / "ok").mkdir()
    assert resolve_adapter_dir(root, "ok") == (root / "ok").resolve()
    with pytest.raises(AdapterLoadError, match="outside the adapter root"):
        resolve_adapter_dir(root, "escape")
    with pytest.raises(AdapterLoadError) as err:
        resolve_adapter_dir(root, "missing")
    assert err.value.reason == "not_found"
    os.symlink(root / "loop-b", root / "loop-a")
    os.symlink(root / "loop-a", root / "loop-b")
    with pytest.raises(AdapterLoadError) as err:
        resolve_adapter_dir(root, "loop-a")
    assert err.value.reason == "invalid" and "cannot be resolved" in str(err.value)  # was a raw RuntimeError


def test_every_malformed_field_is_named_in_one_invalid_error():
    """Type and shape checks happen at parse time (a regex PEFT would build, a list where a number goes),
    all reported together; the reason is "invalid" even when unsupported options are present too."""
    d = {"peft_type": "LORA", "r": 4, "lora_alpha": "big", "target_modules": "([", "rank_pattern": {"(": 4},
         "alpha_pattern": {"q_proj": [2]}, "layers_to_transform": 5.5, "layers_pattern": 7, "exclude_modules": 5,
         "use_rslora": "yes", "bias": "all"}
    with pytest.raises(AdapterLoadError) as err:
        LoraAdapterConfig.from_dict(d)
    msg = str(err.value)
    assert err.value.reason == "invalid"
    for name in ("lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "layers_to_transform",
                 "layers_pattern", "exclude_modules", "use_rslora"):
        assert f"{name}: " in msg, name
    assert "bias='all' is not supported" in msg
