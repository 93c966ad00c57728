"""The aarch64 NEON kernels (neon.c) against the scalar reference (ref.c), without an ARM machine.

tests/neon_driver.c is cross-compiled with aarch64-linux-gnu-gcc and run under qemu-aarch64 -cpu max
(which has the dot-product extension); on an aarch64 host it is compiled and run natively. CI needs
`apt-get install -y gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user`; without them the
cross tests are skipped. The x86 check (neon.c compiles to nothing) needs only the host compiler.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "src" / "ternlm" / "kernels"
DRIVER = ROOT / "tests" / "neon_driver.c"
# The extension's own flags (setup.py): -ffp-contract=off keeps ref.c's float order unfused.
CFLAGS = ["-O2", "-std=c11", "-pthread", "-fno-strict-aliasing", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror"]
SOURCES = ["_kernels", "threads", "ref", "avx2", "avx512", "neon", "ops"]
NATIVE = platform.machine() in ("aarch64", "arm64")


def _toolchain() -> tuple[str, list[str]] | str:
    """(compiler, runner prefix), or the reason the NEON tests cannot run here."""
    if NATIVE:
        cc = shutil.which("cc") or shutil.which("gcc")
        return (cc, []) if cc else "no C compiler on this aarch64 host"
    cc = shutil.which("aarch64-linux-gnu-gcc")
    if cc is None:
        return "aarch64-linux-gnu-gcc not installed (apt-get install gcc-aarch64-linux-gnu)"
    libc = subprocess.run([cc, "-print-file-name=libc.a"], capture_output=True, text=True).stdout.strip()
    if not Path(libc).is_absolute():
        return "static aarch64 libc not installed (apt-get install libc6-dev-arm64-cross)"
    qemu = shutil.which("qemu-aarch64")
    if qemu is None:
        return "qemu-aarch64 not installed (apt-get install qemu-user)"
    return cc, [qemu, "-cpu", "max"]


TOOLCHAIN = _toolchain()
needs_aarch64 = pytest.mark.skipif(isinstance(TOOLCHAIN, str), reason=str(TOOLCHAIN))


@needs_aarch64
@pytest.mark.parametrize("seed", [1234, 98765])
def test_neon_matches_ref(tmp_path: Path, seed: int) -> None:
    """Random shapes (k not a multiple of 256, n not a multiple of the row tile, m = 1 and m > 1):
    quantization, ternary, Q8_0 and Q4_0 bit-identical, float matmul within the usual bound."""
    cc, runner = TOOLCHAIN
    exe = tmp_path / "neon_driver"
    srcs = [str(DRIVER)] + [str(KERNELS / f"{name}.c") for name in ("ref", "neon", "threads")]
    subprocess.run([cc, *CFLAGS, "-static", "-I", str(KERNELS), *srcs, "-lm", "-o", str(exe)], check=True)
    run = subprocess.run([*runner, str(exe), str(seed)], capture_output=True, text=True, timeout=60)
    if run.returncode == 77:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 mismatches" in run.stdout


@needs_aarch64
def test_kernel_sources_warning_free_on_aarch64(tmp_path: Path) -> None:
    """Every kernel source compiles for aarch64 with -Wall -Wextra -Werror (_kernels.c with this
    Python's headers: compile only, which works across architectures of the same word size)."""
    cc, _ = TOOLCHAIN
    py_include = sysconfig.get_paths()["include"]
    for name in SOURCES:
        cmd = [cc, *CFLAGS, "-I", str(KERNELS), "-I", py_include, "-c", str(KERNELS / f"{name}.c")]
        done = subprocess.run([*cmd, "-o", str(tmp_path / f"{name}.o")], capture_output=True, text=True)
        assert done.returncode == 0, f"{name}.c:\n{done.stderr}"


@pytest.mark.skipif(NATIVE, reason="checks the non-ARM build")
@pytest.mark.skipif(shutil.which("cc") is None, reason="no host C compiler")
def test_neon_compiles_to_nothing_off_arm(tmp_path: Path) -> None:
    obj = tmp_path / "neon.o"
    subprocess.run(["cc", *CFLAGS, "-I", str(KERNELS), "-c", str(KERNELS / "neon.c"), "-o", str(obj)], check=True)
    nm = shutil.which("nm")
    if nm is not None:
        symbols = subprocess.run([nm, str(obj)], capture_output=True, text=True, check=True).stdout
        assert "tl_neon" not in symbols
