"""Fixtures for the in-process unit tests: models loaded the way LoadModel
loads them (`mlx_backend.model_loader.load_model`), no server, no gRPC.

`loaded` is the plain tiny ChatML model (tests/conftest.py's `tiny_model`);
`marker_loaded` has <think>/<tool_call> tokens and a Qwen-style tool template.
`configure` gives a copy of a loaded model with other LoadModel options (or
another context length) without loading it again.
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_backend.model_loader import load_model
from mlx_backend.options import parse_options
from mlx_backend.request import LoadRequest
from tiny_model import build_tiny_model


ROOT = Path(__file__).resolve().parents[2]
PRELOAD = ROOT / "mlx_backend" / "blas" / "preload.sh"


def blas_preload(home, **env) -> str:
    """What run.sh would preload with HOME=`home` and `env` added
    (mlx_backend/blas/preload.sh builds its libraries under that home)."""
    done = subprocess.run(["bash", str(PRELOAD)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(home), **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def run_preloaded(code: str, preload: str, *args, **env) -> subprocess.CompletedProcess:
    """Python `code` (with `args`) in a process of its own with LD_PRELOAD
    `preload`, as run.sh starts the server."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "LD_PRELOAD": preload, **env})


@pytest.fixture(scope="module")
def blas_home(tmp_path_factory):
    """A home of the module's own: preload.sh's libraries are built there, not
    in ~/.cache."""
    return tmp_path_factory.mktemp("home")


def load(folder, *options):
    return load_model(LoadRequest(model=str(folder), options=list(options)),
                      parse_options(list(options)))


@pytest.fixture(scope="session")
def loaded(tiny_model):
    return load(tiny_model)


@pytest.fixture(scope="session")
def marker_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("unit-markers") / "tiny-markers",
                            markers=True)


@pytest.fixture(scope="session")
def marker_loaded(marker_model):
    loaded = load(marker_model)
    assert loaded.tokenizer.has_tool_calling and loaded.tokenizer.tool_parser is not None
    assert loaded.tokenizer.has_thinking
    return loaded


@pytest.fixture(scope="session")
def tok(marker_loaded):
    return marker_loaded.tokenizer


@pytest.fixture(scope="session")
def configure():
    def configure(loaded, *options, context_length=None):
        return dataclasses.replace(
            loaded, settings=parse_options(list(options)),
            context_length=context_length or loaded.context_length)
    return configure
