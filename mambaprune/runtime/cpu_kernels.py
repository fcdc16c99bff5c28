"""The C++ CPU kernels (``csrc/``: the scan and the alignment convs): built on first use, cached, optional.

Why C++: on the CPU the token loop of the scan, and the per-tap loop of the alignment convs, cost
per-op dispatch, not arithmetic (DESIGN.md, CPU notes). One compiled loop per (sample, block of
channels) removes the dispatch.

Why built on first use instead of shipped: the kernels are compiled for the machine's vector ISA
(AVX512 / AVX2, with ATen's own flags) by ``torch.utils.cpp_extension.load`` into
TORCH_EXTENSIONS_DIR (default ``~/.cache/torch_extensions``); later processes load the cached
library in milliseconds. Building needs a C++ compiler and ``ninja``. When either is missing or the
build fails, ``load_cpu_kernels()`` returns None for the rest of the process, warns once (the
reason and the fix), and every op runs its pure-PyTorch implementation: never an error for the
user. ``cpu_kernels_status()`` says what happened; ``MAMBAPRUNE_CPU_KERNELS=0`` skips the build.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "cpu_kernels.cpp"  # the one translation unit; it includes the kernel headers
DISABLE_ENV_VAR = "MAMBAPRUNE_CPU_KERNELS"
_NAMESPACE = "mambaprune_cpu"

# ATen's own per-ISA compile flags (torch's cmake/Codegen.cmake), for the capability torch itself
# dispatches to on this machine.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}


@dataclass(frozen=True)
class CpuKernelStatus:
    """Whether the C++ kernels are loaded; if not, why; if so, how long building or loading took."""

    available: bool
    detail: str
    seconds: Optional[float] = None


def _isa() -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in _ISA_FLAGS else "DEFAULT"


def _sources_digest() -> str:
    """A digest of csrc/: cpp_extension hashes only the .cpp it compiles, not the headers it includes."""
    digest = hashlib.sha256()
    for path in sorted(CSRC.glob("*.[ch]*")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _build_flags(isa: str) -> list[str]:
    # -fopenmp: this torch build's at::parallel_for is an inline OpenMP loop; without the flag it
    # runs on one thread. The library links libgomp by soname, so it shares torch's OpenMP runtime.
    # The digest makes an edit of any header change the build command, hence a rebuild.
    return ["-O3", "-DNDEBUG", "-fopenmp", f"-DMAMBAPRUNE_SOURCES={_sources_digest()}",
            *_ISA_FLAGS.get(isa, ["-DCPU_CAPABILITY=DEFAULT"])]


def _missing_tool() -> Optional[str]:
    """Why a build cannot even start (no ninja, no compiler), or None."""
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found ({compiler!r} is not on PATH; install g++ or set CXX)"
    return None


def _build_and_load(isa: str) -> None:
    """Compile csrc/cpu_kernels.cpp (or reuse its cached build) and load it into torch.ops."""
    from torch.utils import cpp_extension

    # The ISA is part of the name: a cache directory shared by machines never mixes builds.
    cpp_extension.load(
        name=f"mambaprune_cpu_kernels_{isa.lower()}",
        sources=[str(SOURCE)],
        extra_cflags=_build_flags(isa),
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def _failure_reason(error: Exception) -> str:
    """The compiler's first error line (file:line:col: error: ...) if there is one, else the last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first_error = next((line for line in lines if re.search(r":\d+:\d+: (fatal )?error:", line)), None)
    return f"build failed: {type(error).__name__}: {first_error or (lines[-1] if lines else '')}"


def _warn_fallback(reason: str) -> None:
    warnings.warn(
        f"mambaprune: the C++ CPU kernels are unavailable ({reason}); the scan and the alignment convs "
        f"run their slower PyTorch implementations. Install a C++ compiler and ninja (pip install ninja) "
        f"to enable the kernels, or set {DISABLE_ENV_VAR}=0 to skip them without this warning.",
        RuntimeWarning,
        stacklevel=4,
    )


@functools.lru_cache(maxsize=None)
def _load() -> CpuKernelStatus:
    if os.environ.get(DISABLE_ENV_VAR, "").strip() == "0":
        return CpuKernelStatus(False, f"disabled by {DISABLE_ENV_VAR}=0")
    reason = _missing_tool()
    if reason is None:
        start = time.perf_counter()
        try:
            _build_and_load(_isa())
        except Exception as error:  # any build or load failure means: fall back, never fail the user
            reason = _failure_reason(error)
        else:
            return CpuKernelStatus(True, f"loaded the {_isa()} build of csrc/{SOURCE.name}",
                                   time.perf_counter() - start)
    _warn_fallback(reason)
    return CpuKernelStatus(False, reason)


def load_cpu_kernels() -> Optional[object]:
    """torch.ops.mambaprune_cpu once the kernels are built and loaded, else None (warned once)."""
    return getattr(torch.ops, _NAMESPACE) if _load().available else None


def cpu_kernels_status() -> CpuKernelStatus:
    """What ``load_cpu_kernels`` found: available or not, and why (tries the build if not yet tried)."""
    return _load()


def reset_cpu_kernels_cache() -> None:
    """Forget the outcome of the last load attempt, so the next call tries again (tests use it)."""
    _load.cache_clear()
