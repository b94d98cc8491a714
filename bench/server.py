"""The backend process (the package's ServerProcess), plus the timings and
readings the bench needs from it."""

import re
import time
from pathlib import Path
from typing import Dict, Optional

import backend_pb2
from mlx_backend.server_process import ServerProcess, load_model

H = backend_pb2.HealthMessage()


class Server(ServerProcess):
    def __init__(self, log_dir: Path, name: str, env: Optional[Dict[str, str]] = None):
        super().__init__(Path(log_dir), env=env, name=name)

    def load(self, model: str, options=(), **fields) -> dict:
        """LoadModel (`fields`: more ModelOptions, e.g. DraftModel); returns the
        client-side wall time and the server's message."""
        t0 = time.perf_counter()
        result = load_model(self.stub, model, options, timeout=900, **fields)
        wall = time.perf_counter() - t0
        if not result.success:
            raise RuntimeError(f"LoadModel({model}) failed: {result.message}")
        reported = re.search(r" in ([0-9.]+)s$", result.message)
        return {"wall_s": wall, "message": result.message,
                "server_s": float(reported.group(1)) if reported else None}

    def status(self) -> dict:
        reply = self.stub.Status(H, timeout=30)
        return {"state": backend_pb2.StatusResponse.State.Name(reply.state),
                **dict(reply.memory.breakdown)}

    def wait_idle(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.stub.Status(H, timeout=30).state != backend_pb2.StatusResponse.BUSY:
                return
            time.sleep(0.05)
        raise RuntimeError(f"server {self.name} still BUSY after {timeout}s")

    def metrics(self):
        return self.stub.GetMetrics(backend_pb2.MetricsRequest(), timeout=30)

    def blas(self) -> dict:
        """What the server logged about its device and BLAS at LoadModel."""
        text = self.log_text()
        out = {}
        m = re.findall(r"loaded .* on (\w+): weights ([^,(]+(?:\([^)]*\))?)", text)
        if m:
            out["device"], out["weight_format"] = m[-1][0], m[-1][1].strip()
        m = re.findall(r"CPU fast path: BLAS (\S+)", text)
        if m:
            out["blas"] = m[-1]
        elif "CPU fast path unavailable" in text:
            out["blas"] = "none (no optimized BLAS loaded)"
        return out
