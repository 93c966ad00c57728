"""Exceptions ternlm raises for bad input: each names the thing that is wrong and why."""


class TernlmError(Exception):
    """Base class of every error ternlm raises on purpose."""


class FormatError(TernlmError):
    """A model file or directory is missing, malformed or of an unsupported kind."""


class ShapeError(TernlmError):
    """An array handed to ternlm has the wrong shape, dtype or layout."""


class ContextOverflowError(TernlmError):
    """The prompt plus the requested tokens do not fit in the model's context."""


class KernelError(TernlmError):
    """The C kernels rejected their arguments (a bug in the caller, reported instead of crashing)."""


class ParamError(TernlmError, ValueError):
    """A generation or sampling parameter is out of range (a client error: HTTP 400)."""


class OverloadedError(TernlmError):
    """The server's request queue is full; the client should retry later (HTTP 503)."""


class EngineError(TernlmError):
    """The serving engine stopped on an internal error; its requests fail (HTTP 500) and /health says so."""
