"""The tokenizer of a GGUF file, converted once by transformers (~8 s) and cached as a saved tokenizer (~0.5 s).

Cache: ${TESSERA_CACHE:-~/.cache/tessera}/tokenizers/<sha256 of file path, size, mtime, transformers version>/.
A conversion is cached only if the saved copy round-trips (same ids on a probe text, same chat template).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from server.errors import ModelLoadError

log = logging.getLogger("tessera.loader")

_PROBE = "Hello, world!  héllo naïve 世界 🙂\n\tdef f(x):\n    return x ** 2  # 12345 ÷ 7"
_PROBE_MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"}]


def cache_root() -> Path:
    return Path(os.environ.get("TESSERA_CACHE") or Path.home() / ".cache" / "tessera").expanduser()


def cache_dir(gguf_path: Path) -> Path:
    """Where the tokenizer of `gguf_path` is cached; a changed file (size or mtime) gets a new entry."""
    import transformers

    st = gguf_path.stat()
    key = f"{gguf_path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0transformers {transformers.__version__}"
    return cache_root() / "tokenizers" / hashlib.sha256(key.encode()).hexdigest()


def gguf_tokenizer(gguf_path: Path):
    """-> the tokenizer transformers builds from the GGUF metadata, from the cache when possible."""
    from transformers import AutoTokenizer

    cached = cache_dir(gguf_path)
    if (cached / "tokenizer_config.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(cached))
            log.info("tokenizer of %s from the cache %s", gguf_path.name, cached)
            return tokenizer
        except Exception as e:  # a damaged cache entry: drop it and convert again
            log.warning("cached tokenizer %s is unreadable (%s); converting the GGUF tokenizer again", cached, e)
            shutil.rmtree(cached, ignore_errors=True)
    t0 = time.monotonic()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:  # transformers' GGUF conversion raises many kinds
        raise ModelLoadError(f"{gguf_path}: cannot build the tokenizer from the GGUF metadata "
                             f"({type(e).__name__}: {e})") from e
    log.info("converted the tokenizer of %s in %.1fs", gguf_path.name, time.monotonic() - t0)
    _store(tokenizer, cached)
    return tokenizer


def same_tokenizer(a, b) -> bool:
    """Same vocabulary size, ids on a probe text (special tokens included) and chat template output."""
    text = _PROBE + " ".join(a.all_special_tokens)
    if len(a) != len(b) or a(text).input_ids != b(text).input_ids or a.chat_template != b.chat_template:
        return False
    if a.chat_template is None:
        return True
    render = dict(tokenize=False, add_generation_prompt=True)
    return a.apply_chat_template(_PROBE_MESSAGES, **render) == b.apply_chat_template(_PROBE_MESSAGES, **render)


def _store(tokenizer, target: Path) -> None:
    """Save into a temporary sibling, check it round-trips, then rename into place (atomic; first writer wins)."""
    from transformers import AutoTokenizer

    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        tokenizer.save_pretrained(str(tmp))
        if not same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(str(tmp))):
            log.warning("the saved tokenizer does not round-trip; not caching it (loads stay slow)")
            return
        os.rename(tmp, target)
        tmp = None
        log.info("cached the tokenizer in %s", target)
    except OSError as e:  # read-only home, full disk, another process renamed first
        if not target.is_dir():
            log.warning("cannot cache the tokenizer in %s: %s", target, e)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
