"""Build the ternlm.kernels._kernels C extension (metadata lives in pyproject.toml).

One compile command for every file: ISA-specific code selects its instruction set with
`#pragma GCC target` inside avx2.c / avx512.c / neon.c and is picked at run time, so no -march flag
is used and the wheel runs on any x86-64 or aarch64 (each ISA file compiles to nothing on the other
architecture; elsewhere the build is scalar-only).
"""

import sys

from setuptools import Extension, setup

KERNELS = "src/ternlm/kernels"

extra_compile_args = [
    "-O3",
    "-std=c11",
    "-pthread",
    "-fno-strict-aliasing",
    # Activation quantization must match numpy bit for bit: no fused multiply-adds behind our back.
    "-ffp-contract=off",
    "-Wall",
    "-Wextra",
]
if sys.platform == "win32":
    extra_compile_args = []

kernels = Extension(
    "ternlm.kernels._kernels",
    sources=[f"{KERNELS}/{name}.c" for name in ("_kernels", "threads", "ref", "avx2", "avx512", "amx", "neon", "ops")],
    depends=[f"{KERNELS}/ternary.h"],
    include_dirs=[KERNELS],
    extra_compile_args=extra_compile_args,
    extra_link_args=["-pthread"] if sys.platform != "win32" else [],
    libraries=["m"] if sys.platform != "win32" else [],
)

setup(ext_modules=[kernels])
