"""LoadModel builds MLX's fused CPU kernels (mlx_backend/warm_up.py): on a
machine that has none yet, the requests after it build no new ones."""

import platform
import shutil
import threading

import pytest

from conftest import predict


def kernel_files(home):
    return sorted(home.glob(".cache/mlx-backend/kernels-*/tmp/mlx/*/cpu/*.so"))


@pytest.mark.skipif(platform.system() != "Linux" or not shutil.which("g++"),
                    reason="MLX's CPU kernels are built with g++ on Linux")
def test_load_builds_the_kernels_requests_use(server_factory, tiny_model, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    server = server_factory(env={"HOME": str(home)})  # an empty kernel folder
    reply = server.load(tiny_model)
    assert reply.success, reply.message
    built = kernel_files(home)
    assert built, "LoadModel built no kernels"

    predict(server.stub, "Hello there", Tokens=6, IgnoreEOS=True)
    together = [threading.Thread(target=predict, args=(server.stub, prompt),
                                 kwargs={"Tokens": 6, "IgnoreEOS": True})
                for prompt in ("One", "Two words here", "and a third, longer prompt")]
    for thread in together:
        thread.start()
    for thread in together:
        thread.join()
    predict(server.stub, "Sampled", Tokens=6, IgnoreEOS=True, Temperature=0.8, TopP=0.9,
            TopK=20, MinP=0.05, Seed=3)
    assert kernel_files(home) == built
