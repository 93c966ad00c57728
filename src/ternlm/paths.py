"""Where ternlm keeps its state on disk; a module of its own so that loading a model imports nothing more."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def home() -> Path:
    """$TERNLM_HOME, else ~/.ternlm: API keys, audit secrets, the converted-model cache, imported models."""
    return Path(os.environ.get("TERNLM_HOME") or Path.home() / ".ternlm")


@contextmanager
def replacing(out: Path) -> Iterator[Path]:
    """A temporary path beside `out` to write; on success it replaces `out` in one rename (readers see the old
    file or the whole new one, never a partial file), else it is removed. The writer fsyncs its data."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable; a filesystem that cannot fsync a directory still renames atomically."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
