"""Open a model from a path, deciding its format from what is there, never from the name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ternlm.config import ModelConfig
from ternlm.errors import FormatError
from ternlm.model import ModelWeights
from ternlm.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """What every reader returns: the model's shape, its weights and (when the source has one) its tokenizer."""

    config: ModelConfig
    weights: ModelWeights
    tokenizer: Tokenizer | None


def open_model(path: str | Path) -> LoadedModel:
    """The model at `path`: a Hugging Face directory, a GGUF file, or ternlm's own .tlm file."""
    path = Path(path)
    if path.is_dir():
        from ternlm.formats.hf import load_hf

        config, weights = load_hf(path)
        tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
        return LoadedModel(config, weights, tokenizer)
    if not path.exists():
        raise FormatError(f"{path}: no such file or directory")
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic.startswith(b"GGUF"):
        from ternlm.formats.gguf import load_gguf

        return load_gguf(path)
    from ternlm.formats.native import NATIVE_MAGIC, load_native

    if magic == NATIVE_MAGIC:
        return load_native(path)
    raise FormatError(f"{path}: not a model directory and not a known model file (magic {magic!r})")
