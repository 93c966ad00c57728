"""Start `ternlm serve` as a real uvicorn process on a free loopback port, for tests that talk HTTP to it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(*args: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> Iterator[str]:
    """Yield the base URL of a `ternlm serve` process started with `args`, once /ready answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "ternlm", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--threads", "1", "--log-level", "warning", *args]
    # The server's output goes to the test's captured output, shown when a test fails.
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ternlm serve exited with {proc.returncode}; its output is above")
            try:
                if httpx.get(url + "/ready", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ternlm serve did not become ready in {timeout} s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
