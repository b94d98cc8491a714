"""LoadModel builds MLX's fused CPU kernels (mlx_backend/warm_up.py): on a
machine that has none yet, the requests after it build no new ones."""

import os
import platform
import shutil
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import pytest

from conftest import predict


def kernel_files(home):
    return sorted(home.glob(".cache/mlx-backend/kernels-*/tmp/mlx/*/cpu/*.so"))


@pytest.mark.skipif(platform.system() != "Linux" or not shutil.which("g++")
                    or os.environ.get("MLX_BACKEND_NATIVE_KERNELS") == "0"
                    or mx.default_device().type != mx.DeviceType.cpu,
                    reason="the server builds MLX's CPU kernels under HOME on Linux CPUs")
def test_load_builds_the_kernels_requests_use(server_factory, tiny_model, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    server = server_factory(env={"HOME": str(home)})  # an empty kernel folder
    reply = server.load(tiny_model)
    assert reply.success, reply.message
    built = kernel_files(home)
    assert built, "LoadModel built no kernels"

    replies = [predict(server.stub, "Hello there", Tokens=6, IgnoreEOS=True)]
    with ThreadPoolExecutor(3) as pool:  # batched together, as they arrive at once
        replies += pool.map(lambda prompt: predict(server.stub, prompt, Tokens=6,
                                                   IgnoreEOS=True),
                            ["One", "Two words here", "and a third, longer prompt"])
    replies.append(predict(server.stub, "Sampled", Tokens=6, IgnoreEOS=True, Temperature=0.8,
                           TopP=0.9, TopK=20, MinP=0.05, Seed=3))
    assert [reply.tokens for reply in replies] == [6] * 5
    assert kernel_files(home) == built
