"""The compiled CPU kernels of the bit-mask and CSR16 formats (``kernels.c``): built on first use, cached, loaded.

``kernels.c`` is plain C99 with per-function ``target`` attributes (generic, AVX2+FMA, AVX-512F in one library,
chosen at run time), compiled by the system C compiler into a shared library under the cache directory and called
through ``ctypes`` on the tensors' data pointers (``ctypes`` releases the GIL during the call). It needs neither
ninja nor torch's headers, builds in under a second, and does not depend on torch's C++ ABI. Without a C compiler
the kernels are skipped with one log line and the torch formats (dense, CSR) serve.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ISAS", "KERNEL_ISA_ENV", "KernelLibrary", "cache_dir", "find_compiler", "load_kernels"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
#: The instruction-set paths of ``kernels.c``, slowest first.
ISAS = ("generic", "avx2", "avx512")
#: Set to ``generic`` or ``avx2`` to run a slower path than the CPU allows (tests, comparisons).
KERNEL_ISA_ENV = "LIGHTNING_SELFISH_KERNEL_ISA"
CACHE_ENV = "LIGHTNING_SELFISH_CACHE"
_FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-fno-strict-aliasing")
_ABI = 3

_p, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "bitmask_mv": (_i64, _i64, _p, _p, _p, _p, _p, _int, _int),
    "bitmask_mm": (_i64, _i64, _p, _p, _p, _p, _i64, _p, _int),
    "csr16_mv": (_i64, _p, _p, _p, _p, _p, _int),
    "csr16_mm": (_i64, _i64, _p, _p, _p, _i64, _p, _i64, _p, _p, _int),
}
#: The functions that return a status (0, or -1 when their work space could not be allocated); the rest return none.
_RETURNS_STATUS = {"csr16_mm"}


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where built kernels and measured crossover tables live: ``explicit``, else ``$LIGHTNING_SELFISH_CACHE``, else
    ``$XDG_CACHE_HOME/lightning_selfish``, else ``~/.cache/lightning_selfish`` (then ``inference/`` below it)."""
    if explicit is not None:
        return Path(explicit).expanduser()
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "inference"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lightning_selfish" / "inference"


def find_compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` if set (it must exist), else ``cc``, ``gcc`` or ``clang`` on the PATH."""
    env = os.environ.get("CC")
    if env:
        command = shlex.split(env)
        return command if command and shutil.which(command[0]) else None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


@dataclass(frozen=True)
class KernelLibrary:
    """The loaded library: its path, the best instruction set this CPU runs, whether it was built with OpenMP."""

    path: Path
    best_isa: str
    openmp: bool
    library: ctypes.CDLL

    def isa(self, requested: str | None = None) -> str:
        """The path to run: ``requested`` (or ``$LIGHTNING_SELFISH_KERNEL_ISA``), else the best this CPU runs."""
        requested = requested or os.environ.get(KERNEL_ISA_ENV) or self.best_isa
        if requested not in ISAS:
            raise ValueError(f"kernel isa must be one of {ISAS}, got {requested!r} (from ${KERNEL_ISA_ENV}?)")
        if ISAS.index(requested) > ISAS.index(self.best_isa):
            raise ValueError(f"kernel isa {requested!r} is not supported by this CPU (best: {self.best_isa!r})")
        return requested

    @property
    def build(self) -> str:
        """The build's digest (of ``kernels.c``, the flags and the ABI): a crossover measured with it is its own."""
        return self.path.stem.rsplit("_", 1)[-1]

    def function(self, name: str, isa: str) -> ctypes._CFuncPtr:
        """``name`` (``bitmask_mv``, ``bitmask_mm``, ``csr16_mv``, ``csr16_mm``) compiled for ``isa``."""
        return getattr(self.library, f"{name}_{isa}")


def _bind(library: ctypes.CDLL) -> None:
    library.selfish_best_isa.restype = ctypes.c_int
    library.selfish_abi_version.restype = ctypes.c_int
    for name, argtypes in _SIGNATURES.items():
        for isa in ISAS:
            function = getattr(library, f"{name}_{isa}", None)
            if function is not None:
                function.argtypes = argtypes
                function.restype = ctypes.c_int if name in _RETURNS_STATUS else None


def _build(compiler: list[str], target: Path) -> bool:
    """Compile ``kernels.c`` into ``target`` (with OpenMP if the compiler has it); True with OpenMP."""
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for openmp in (True, False):
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as handle:
            partial = Path(handle.name)
        command = [*compiler, *_FLAGS, *(["-fopenmp"] if openmp else []), str(SOURCE), "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            os.replace(partial, target)  # atomic: another process building the same library meanwhile is harmless
            return openmp
        partial.unlink(missing_ok=True)
        lines = result.stderr.strip().splitlines()
        errors.append(next((line for line in lines if "error" in line), lines[-1] if lines else "(no message)"))
    raise RuntimeError(f"{' '.join(compiler)} failed: {errors}")


@functools.cache
def _load(directory: str, compiler_env: str | None) -> KernelLibrary | None:
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + repr((_FLAGS, platform.machine(), _ABI)).encode()).hexdigest()[:16]
    target = Path(directory) / "kernels" / f"selfish_kernels_{digest}.so"
    marker = target.with_suffix(".openmp")
    if not target.exists():
        compiler = find_compiler()
        if compiler is None:
            log.warning(
                "lightning_selfish.inference: no C compiler (CC=%s; no cc, gcc or clang on the PATH): the compiled "
                "bit-mask and CSR16 kernels are skipped, the torch formats (dense, CSR) serve",
                compiler_env,
            )
            return None
        try:
            if _build(compiler, target):
                marker.touch()
        except (RuntimeError, OSError) as error:
            log.warning(
                "lightning_selfish.inference: building the sparse kernels failed (%s): they are skipped, the torch "
                "formats (dense, CSR) serve",
                error,
            )
            return None
    library = ctypes.CDLL(str(target))
    _bind(library)
    if library.selfish_abi_version() != _ABI:
        raise RuntimeError(f"{target}: kernel ABI {library.selfish_abi_version()}, expected {_ABI}")
    best = ISAS[library.selfish_best_isa()]
    return KernelLibrary(target, best, marker.exists(), library)


def load_kernels(directory: str | os.PathLike | None = None) -> KernelLibrary | None:
    """The compiled kernels (built into :func:`cache_dir` on first use), or None without a working C compiler."""
    return _load(str(cache_dir(directory)), os.environ.get("CC"))
