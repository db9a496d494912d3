"""Adapter ids are relative paths under --adapter-root, and never leave it."""
from __future__ import annotations

import re
from pathlib import Path

from server.errors import AdapterLoadError

MAX_ID_LEN = 256
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*$")


def check_adapter_id(adapter_id: str) -> str:
    """Ids look like 'team/sql-r16': letters, digits, '.', '_', '-', '/'-separated, no '..', bounded."""
    if not adapter_id:
        raise AdapterLoadError("invalid", "adapter_id is empty")
    if len(adapter_id) > MAX_ID_LEN:
        raise AdapterLoadError("invalid", f"adapter_id is longer than {MAX_ID_LEN} characters")
    if "\x00" in adapter_id or not _ID.match(adapter_id) or ".." in adapter_id.split("/"):
        raise AdapterLoadError("invalid", f"adapter_id {adapter_id[:80]!r} is not a relative name made of letters, "
                               "digits, '.', '_', '-' and '/' (no '..', no leading '/')")
    return adapter_id


def resolve_adapter_dir(root: Path | None, adapter_id: str) -> Path:
    """<root>/<adapter_id>, after symlinks, strictly inside root; NOT_FOUND-style error when absent."""
    check_adapter_id(adapter_id)
    if root is None:
        raise AdapterLoadError("not_found", f"adapter {adapter_id!r} is not loaded and the server has no "
                               "--adapter-root to load it from")
    real_root = Path(root).resolve()
    try:
        path = (real_root / adapter_id).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise AdapterLoadError("invalid", f"adapter {adapter_id!r} cannot be resolved under the adapter root "
                               f"({exc})") from None
    if path != real_root and real_root not in path.parents:
        raise AdapterLoadError("invalid", f"adapter {adapter_id!r} resolves outside the adapter root")
    if not path.is_dir():
        raise AdapterLoadError("not_found", f"adapter {adapter_id!r} is neither loaded nor a directory under "
                               "the adapter root")
    return path


def resolve_adapter_path(path: str | Path) -> Path:
    """An explicit adapter directory (admin LoadAdapter), absolute after symlinks; a path the OS cannot
    take (a NUL byte, a symlink loop) is an "invalid" error naming `path`, never an OS exception."""
    text = str(path)
    if not text:
        raise AdapterLoadError("invalid", "path: is empty")
    if "\x00" in text:
        raise AdapterLoadError("invalid", f"path: {text[:80]!r} contains a NUL byte")
    try:
        return Path(text).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop
        raise AdapterLoadError("invalid", f"path: {text[:200]!r} cannot be resolved ({exc})") from None
