"""Part of the CPU fast path: MLX's fused CPU kernels built for this CPU.

`mx.compile` on the CPU fuses elementwise work into C++ that MLX builds at
first use with `g++ -std=c++17 -O3`: generic x86-64 code, in which every
fused multiply-add of MLX's `exp` (softmax, SiLU) is a call into libm. A `g++`
put first on PATH adds `-march=native -ffp-contract=off`: the same operations
in the same order (no multiply-add is fused that was not; an fma rounds
exactly once in hardware as in libm), so the same bits, and `exp` about 4x
faster. MLX keeps built kernels under `$TMPDIR/mlx/`; TMPDIR points at a
folder of this CPU, compiler and flags, so no kernel built otherwise is ever
loaded (and the kernels survive restarts). Python's own temporary files stay
where they were.

MLX_BACKEND_NATIVE_KERNELS=0 leaves MLX's build as it is.
"""

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

FLAGS = "-march=native -ffp-contract=off -fno-trapping-math -finline-limit=1000"
ENV = "MLX_BACKEND_NATIVE_KERNELS"


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            lines = [line for line in info if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compiler_works(gxx: str, folder: Path) -> bool:
    source = folder / "probe.cpp"
    source.write_text("#include <cmath>\nfloat f(float a, float b, float c) "
                      "{ return std::fma(a, b, c); }\n")
    try:
        done = subprocess.run([gxx, "-std=c++17", "-O3", "-fPIC", "-shared", *FLAGS.split(),
                               str(source), "-o", str(folder / "probe.so")],
                              capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def enable(cache_root: Optional[Path] = None) -> Optional[str]:
    """Build MLX's fused CPU kernels for this CPU from now on (Linux, g++ at
    hand, not turned off); returns the kernels' folder, or None."""
    if platform.system() != "Linux" or os.environ.get(ENV, "1") == "0":
        return None
    gxx = shutil.which("g++")
    if gxx is None:
        return None
    version = subprocess.run([gxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(f"{_cpu_identity()}\n{version}\n{FLAGS}\n{gxx}".encode())
    root = cache_root or Path.home() / ".cache" / "mlx-backend"
    folder = root / f"kernels-{key.hexdigest()[:16]}"
    wrapper = folder / "bin" / "g++"
    script = f'#!/bin/sh\nexec "{gxx}" "$@" {FLAGS}\n'
    try:
        # The wrapper is written only once the compiler took the flags, and the
        # folder is this compiler's: a wrapper in place needs no new probe.
        (folder / "tmp").mkdir(parents=True, exist_ok=True)  # MLX fails without it
        if not wrapper.exists() or wrapper.read_text() != script:
            (folder / "bin").mkdir(exist_ok=True)
            if not _compiler_works(gxx, folder):
                log.warning("g++ rejects %s: MLX's fused CPU kernels stay generic", FLAGS)
                return None
            staged = wrapper.with_suffix(f".{os.getpid()}")
            staged.write_text(script)
            staged.chmod(0o755)
            staged.replace(wrapper)
    except OSError as err:
        log.warning("cannot set up native CPU kernels in %s: %s", folder, err)
        return None
    if os.environ.get("TMPDIR") == str(folder / "tmp"):
        return str(folder)  # enabled before
    tempfile.gettempdir()  # Python's temporary folder is settled before TMPDIR moves
    os.environ["PATH"] = f"{folder / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["TMPDIR"] = str(folder / "tmp")
    return str(folder)
