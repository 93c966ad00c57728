"""Where ternlm keeps its state on disk; a module of its own so that loading a model imports nothing more."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """$TERNLM_HOME, else ~/.ternlm: API keys, audit secrets, the converted-model cache, imported models."""
    return Path(os.environ.get("TERNLM_HOME") or Path.home() / ".ternlm")
