"""The backend as a separate process, started the way LocalAI starts it.

LocalAI runs `run.sh --addr HOST:PORT` and polls Health until it answers; the
tests, the benchmark and client.py do the same, so each of them exercises the
real entry point (run.sh's environment, gRPC, signal handling) and none keeps
its own copy of the start/wait/stop dance.

Nothing here imports MLX: callers only speak gRPC, and importing this must stay
cheap (client.py, pytest collection).
"""

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import List

import grpc

import backend_pb2
import backend_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
RUN_SH = ROOT / "run.sh"


def free_ports(n: int) -> List[int]:
    """`n` distinct free ports on 127.0.0.1 (all bound at once, so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def _run_sh(args, env=None, log=None) -> subprocess.Popen:
    """`run.sh ARGS`; `env` is added to ours; output goes to `log` (an open
    file) or, when None, to our own stdout/stderr."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1")  # the log shows lines as they happen
    full_env.update(env or {})
    return subprocess.Popen([str(RUN_SH), *args], stdout=log,
                            stderr=subprocess.STDOUT if log is not None else None,
                            env=full_env)


def start(addr: str, args=(), env=None, log=None) -> subprocess.Popen:
    """`run.sh --addr ADDR ARGS` (see _run_sh)."""
    return _run_sh(["--addr", addr, *args], env, log)


def write_hostfile(path, ranks: int = 2) -> Path:
    """A ring hostfile of `ranks` free ports on 127.0.0.1 (entry i = rank i)."""
    path = Path(path)
    path.write_text(json.dumps([f"127.0.0.1:{port}" for port in free_ports(ranks)]))
    return path


def start_worker(hostfile, rank: int = 1, env=None, log=None) -> subprocess.Popen:
    """`run.sh --worker --backend ring --hostfile H --rank N`, as
    `local-ai worker mlx-distributed` starts a worker rank."""
    return _run_sh(["--worker", "--backend", "ring", "--hostfile", str(hostfile),
                    "--rank", str(rank)], env, log)


def wait_healthy(stub, proc=None, timeout=120, metadata=None, log_tail=None):
    """Poll Health until the server answers; raise RuntimeError if `proc` exits
    first (with `log_tail()` when given) or after `timeout` seconds.

    UNAUTHENTICATED counts as up: a server with an auth token is serving, it
    just refuses us.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_tail() if log_tail is not None else ""
            raise RuntimeError(f"server exited with status {proc.returncode}"
                               + (f": {tail}" if tail else ""))
        try:
            stub.Health(backend_pb2.HealthMessage(), timeout=1, metadata=metadata)
            return
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                return
            time.sleep(0.1)
    raise RuntimeError(f"server did not become healthy in {timeout}s")


def load_model(stub, model, options=(), timeout=600, metadata=None, **fields):
    """LoadModel; returns the Result, successful or not (callers decide)."""
    return stub.LoadModel(
        backend_pb2.ModelOptions(Model=str(model), Options=list(options), **fields),
        timeout=timeout, metadata=metadata)


def stop(proc: subprocess.Popen, timeout=30) -> int:
    """SIGTERM (the server drains and exits), then SIGKILL if it takes too long."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class ServerProcess:
    """A backend on a free local port, its log file in `log_dir`, and a stub
    connected to it; healthy when the constructor returns."""

    def __init__(self, log_dir, env=None, args=(), name=None, timeout=120):
        self.addr = f"127.0.0.1:{free_port()}"
        self.name = name or self.addr.split(":")[1]
        self.log_path = Path(log_dir) / f"server-{self.name}.log"
        self._log = open(self.log_path, "w")
        self.started = time.perf_counter()
        self.proc = start(self.addr, args, env, self._log)
        self.returncode = None
        self.channel = grpc.insecure_channel(self.addr)
        self.stub = backend_pb2_grpc.BackendStub(self.channel)
        try:
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        self.healthy_after = time.perf_counter() - self.started

    def wait_healthy(self, timeout=120, metadata=None):
        wait_healthy(self.stub, self.proc, timeout, metadata,
                     log_tail=lambda: self.log_text()[-3000:])

    def load(self, model, options=(), timeout=600, **fields):
        """LoadModel, raising RuntimeError with the server's message if it failed."""
        result = load_model(self.stub, model, options, timeout, **fields)
        if not result.success:
            raise RuntimeError(f"LoadModel({model}) failed: {result.message}")
        return result

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self):
        self.channel.close()
        self.returncode = stop(self.proc)
        self._log.close()
