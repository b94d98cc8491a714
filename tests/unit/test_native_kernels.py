"""mlx_backend/native_kernels.py: MLX's fused CPU kernels built for this CPU
give the very bits of MLX's own kernels, from their own folder."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_backend import native_kernels

ROOT = Path(__file__).resolve().parents[2]

# Compiled (fused, JIT-built) against MLX's built-in ops, on values that reach
# every branch of MLX's exp (NaN, infinities, the +-88 clamps, denormals).
PROBE = r"""
import json, pathlib, sys
from mlx_backend import native_kernels
folder = native_kernels.enable(pathlib.Path(sys.argv[1]))
import mlx.core as mx
x = mx.concatenate([mx.random.normal((200000,), key=mx.random.key(1)) * 40,
                    mx.array([0.0, -0.0, 88.0, 88.1, -88.0, -88.1, 1e-39, -1e-39, 3e38,
                              float("inf"), float("-inf"), float("nan")])])
y = mx.random.normal(x.shape, key=mx.random.key(2))
fused = {"exp": mx.compile(lambda a, b: mx.exp(a - b)),
         "silu": mx.compile(lambda a, b: a * mx.sigmoid(a) * b),
         "inverse": mx.compile(lambda a, b: a * (1 / (mx.abs(b) + 1e-3)))}
builtin = {"exp": lambda a, b: mx.exp(a - b), "silu": lambda a, b: a * mx.sigmoid(a) * b,
           "inverse": lambda a, b: a * (1 / (mx.abs(b) + 1e-3))}
same = {k: bool(mx.array_equal(fused[k](x, y), builtin[k](x, y), equal_nan=True)) for k in fused}
print(json.dumps({"folder": folder, "same": same}))
"""


def probe(cache_root, env=None):
    done = subprocess.run([sys.executable, "-c", PROBE, str(cache_root)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux" or shutil.which("g++") is None,
                    reason="MLX builds fused CPU kernels with g++ on Linux")
def test_native_kernels_give_mlx_bits(tmp_path):
    got = probe(tmp_path)
    folder = Path(got["folder"])
    assert folder.parent == tmp_path
    assert got["same"] == {"exp": True, "silu": True, "inverse": True}
    # The kernels were built through the wrapper into this folder's own TMPDIR.
    assert (folder / "bin" / "g++").read_text().rstrip().endswith(native_kernels.FLAGS)
    assert list((folder / "tmp").rglob("lib*.so"))
    # Same CPU, compiler and flags: the same folder next time, kernels reused.
    assert probe(tmp_path)["folder"] == got["folder"]


def test_native_kernels_can_be_turned_off(tmp_path):
    got = probe(tmp_path, env={native_kernels.ENV: "0"})
    assert got["folder"] is None
    assert all(got["same"].values())
    assert not list(tmp_path.iterdir())
