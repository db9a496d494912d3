"""An adapter's own chat template, as LoRAX uses it: `chat_template.jinja` in the adapter directory, else
`tokenizer_config.json`'s `chat_template` (a string, or transformers' list of named templates: "default").
None = the adapter has none and its chat requests use the base model's."""
from __future__ import annotations

import json
from pathlib import Path

from server.errors import AdapterLoadError

MAX_TEMPLATE_BYTES = 1 << 20


def _read(path: Path, adapter_id: str) -> str:
    if path.stat().st_size > MAX_TEMPLATE_BYTES:
        raise AdapterLoadError("invalid", f"adapter {adapter_id!r}: {path.name} is over {MAX_TEMPLATE_BYTES} bytes")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AdapterLoadError("invalid", f"adapter {adapter_id!r}: {path.name} is not UTF-8 ({exc})") from None


def read_chat_template(adapter_dir: Path, adapter_id: str) -> str | None:
    jinja = adapter_dir / "chat_template.jinja"
    if jinja.is_file():
        return _read(jinja, adapter_id) or None
    cfg_file = adapter_dir / "tokenizer_config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(_read(cfg_file, adapter_id))
    except json.JSONDecodeError as exc:
        raise AdapterLoadError("invalid", f"adapter {adapter_id!r}: tokenizer_config.json is not JSON ({exc})") from None
    tmpl = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if tmpl is None:
        return None
    if isinstance(tmpl, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default")
    if not isinstance(tmpl, str) or not tmpl:
        raise AdapterLoadError("invalid", f"adapter {adapter_id!r}: tokenizer_config.json chat_template must be a "
                               "non-empty string or a list of named templates with a 'default'")
    return tmpl
