"""Find and read the safetensors weights of a Hugging Face directory; pickled checkpoints are refused."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from server.errors import ModelLoadError
from loader.names import canonical_name, check_tensors

log = logging.getLogger("tessera.loader")

INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "pytorch_model.bin.index.json")
# Buffers some old checkpoints saved next to the weights; the model recomputes them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def weight_files(path: Path) -> list[Path]:
    """-> the safetensors files holding the weights: the shards of the index, else every *.safetensors."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = [path / name for name in dict.fromkeys(weight_map.values())]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index (needs a 'weight_map'): {e}") from e
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ModelLoadError(f"{index} names shard(s) that are not in {path}: {', '.join(missing)}")
        return shards
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted({p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern)})
    if pickles:
        raise ModelLoadError(
            f"{path} holds only pickled weights ({', '.join(pickles)}); pickles are never loaded because unpickling "
            f"can run arbitrary code. Convert them to safetensors, e.g. with transformers: "
            f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)")
    raise ModelLoadError(f"{path} has no *.safetensors weights")


def read_tensors(files: list[Path], expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Read exactly the `expected` tensors (HF name -> shape) from `files`; names and shapes are checked from
    the headers before any data is read."""
    located: dict[str, tuple[Path, str]] = {}  # HF name -> (file, name in the file)
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    unexpected: list[str] = []
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                name = canonical_name(key)
                if name in located:
                    raise ModelLoadError(f"tensor {name} is stored twice: as {located[name][1]!r} in "
                                         f"{located[name][0]} and as {key!r} in {file}")
                if name in expected:
                    located[name] = (file, key)
                    found[name] = (tuple(f.get_slice(key).get_shape()), f"{file}")
                elif not name.endswith(_IGNORED_SUFFIXES) and name != "lm_head.weight":  # tied: a redundant copy
                    unexpected.append(key)
    check_tensors(found, expected, f"{files[0].parent} ({', '.join(f.name for f in files)})")
    if unexpected:
        log.warning("ignoring %d tensor(s) the config does not use: %s", len(unexpected), ", ".join(unexpected[:6]))
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        keys = {name: key for name, (f_, key) in located.items() if f_ == file}
        if not keys:
            continue
        with _open(file) as f:
            for name, key in keys.items():
                try:
                    weights[name] = f.get_tensor(key)
                except SafetensorError as e:
                    raise ModelLoadError(f"{file}: cannot read tensor {key}: {e}") from e
    return {n: weights[n] for n in expected}  # in the config's order


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{file}: not a valid safetensors file ({e})") from e
