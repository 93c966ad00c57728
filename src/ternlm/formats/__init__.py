"""Open a model from a path, deciding its format from what is there, never from the name."""

from __future__ import annotations

from pathlib import Path

from ternlm.config import ModelConfig
from ternlm.errors import FormatError
from ternlm.model import ModelWeights


def open_model(path: str | Path) -> tuple[ModelConfig, ModelWeights]:
    """Config and weights of the model at `path` (a Hugging Face directory for now)."""
    path = Path(path)
    if path.is_dir():
        from ternlm.formats.hf import load_hf

        return load_hf(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or directory")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        raise FormatError(f"{path}: GGUF files are not supported yet; convert the Hugging Face directory instead")
    raise FormatError(f"{path}: not a model directory and not a known model file (magic {magic!r})")
