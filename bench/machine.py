"""Facts about the machine and processes, so results can be compared across runs,
and the environment run.sh gives the server, so baselines run like it."""

import os
import platform
import subprocess
import sys
from typing import Dict, Optional

from mlx_backend.server_process import ROOT


def project_python() -> str:
    """The interpreter run.sh starts the server with (the project's venv)."""
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def run_sh_preload(env: Optional[Dict[str, str]] = None) -> Optional[str]:
    """What run.sh puts in LD_PRELOAD (mlx_backend/blas/preload.sh) in
    environment `env` (ours by default), or None."""
    try:
        done = subprocess.run(["bash", str(ROOT / "mlx_backend" / "blas" / "preload.sh")],
                              capture_output=True, text=True, timeout=120,
                              env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def env_like_run_sh(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment run.sh gives the server, for processes compared with it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update(extra or {})
    lib = run_sh_preload(env)
    if lib:
        env["LD_PRELOAD"] = lib + (":" + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
    return env


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    versions = {}
    for dist in ("mlx", "mlx-lm", "mlx-cpu", "mlx-cuda", "grpcio"):
        try:
            from importlib.metadata import version
            versions[dist] = version(dist)
        except Exception:  # not installed
            pass
    gpu = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            gpu = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "memory_bytes": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "nvidia_gpu": gpu,
        "run_sh_ld_preload": run_sh_preload(),
    }


def load_average():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def process_cpu_s(pid):
    """User+system CPU seconds of a process (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def own_cpu_s():
    t = os.times()
    return t.user + t.system
