"""Loads the fused CPU kernel of the modulation (csrc/modulate_cpu.cpp), built on first use.

torch's C++-extension builder compiles it once per machine kind into ~/.cache/torch_extensions
(or $TORCH_EXTENSIONS_DIR) and later processes load the cached library; scripts/env.sh builds it
when it creates the environment, so no timed job pays the ~20 s compile. The library's name
carries the instruction set it was compiled for, so nodes of different CPU kinds sharing one
home directory never load each other's build, and a digest of the source file's path and content
and of the flags: torch rebuilds a library whenever its build recipe (which names the source path)
changes, so two checkouts sharing one cache under one name would rebuild it at every switch, and
a process that loads while the other builds waits on the build lock.

The kernel is an optimisation, never a requirement: without a compiler, on accelerators, in
bf16/fp16, or with HYCAM_FUSED_CPU=0, the modulation runs on torch ops (same results to
rounding, tested). A failed build is reported once, as a warning naming the cause.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "modulate_cpu.cpp"
_lock = threading.Lock()
_module: ModuleType | None = None
_failed = False


def _isa_flags() -> tuple[str, list[str]]:
    """(name suffix, compiler flags) for the widest vector ISA torch detected on this CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        # AVX2+FMA on both: -mavx512f made this kernel no faster where it was tried (docs/performance.md),
        # and one build then serves both kinds of CPU.
        return "avx2", ["-mavx2", "-mfma"]
    return "generic", []


def _library_name(suffix: str, cflags: list[str]) -> str:
    recipe = hashlib.sha256(str(_SOURCE.resolve()).encode() + _SOURCE.read_bytes() + " ".join(cflags).encode())
    return f"hycam_modulate_cpu_{suffix}_{recipe.hexdigest()[:12]}"


def enabled() -> bool:
    return os.environ.get("HYCAM_FUSED_CPU", "1") != "0"


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled kernel, or None when it is disabled or cannot be built here."""
    global _module, _failed
    if _module is not None or _failed or not enabled():
        return _module
    with _lock:
        if _module is None and not _failed:
            suffix, isa = _isa_flags()
            # The two math flags let the SiLU loops vectorise (no errno, no FP traps); no
            # -ffast-math, so NaN and inf propagate as in torch. Reductions are vectorised
            # per loop by `omp simd reduction`.
            cflags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", *isa]
            try:
                from torch.utils.cpp_extension import load as build_and_load

                _module = build_and_load(
                    name=_library_name(suffix, cflags),
                    sources=[str(_SOURCE)],
                    extra_cflags=cflags,
                    extra_ldflags=["-fopenmp"],
                    verbose=verbose,
                )
            except Exception as exc:  # no compiler, no ninja, read-only cache, ...
                _failed = True
                logger.warning(
                    "HyCAM's fused CPU kernel is unavailable (%s: %s); using torch ops, which are slower " "on CPU",
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                )
    return _module


_KERNEL_DTYPES = (torch.float32, torch.float64)


def kernel_for(*tensors: torch.Tensor) -> ModuleType | None:
    """The compiled kernel if these tensors can take it (CPU, float32/float64, kernel available),
    else None. Cheap on purpose (is_cpu, not .device): it runs before every decoding layer's call."""
    if _failed or not enabled():
        return None
    for t in tensors:
        if not t.is_cpu or t.dtype not in _KERNEL_DTYPES:
            return None
    return load()


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can take the fused kernel (CPU, float32/float64, kernel available)."""
    return kernel_for(*tensors) is not None


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself when it is [T, d] with contiguous rows (any row stride), else a contiguous copy."""
    return t if t.dim() == 2 and t.stride(1) == 1 else t.contiguous()
