"""ternlm: run 1.58-bit (ternary) language models fast on ordinary CPUs."""

from ternlm.api import Model, load
from ternlm.errors import ContextOverflowError, FormatError, KernelError, ShapeError, TernlmError
from ternlm.generate import GenerationEvent

__version__ = "0.1.0"

__all__ = [
    "ContextOverflowError", "FormatError", "GenerationEvent", "KernelError", "Model", "ShapeError",
    "TernlmError", "__version__", "load",
]
