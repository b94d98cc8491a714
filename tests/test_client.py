"""The README's main command: `client.py demo` starts a server, loads the
default model and streams an answer."""

import subprocess
import sys

from mlx_backend.server_process import ROOT, free_port


def test_demo_streams_an_answer():
    out = subprocess.run(
        [sys.executable, str(ROOT / "client.py"), "--addr", f"127.0.0.1:{free_port()}", "demo",
         "What is the capital of France?", "--max-tokens", "32"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Paris" in out.stdout
    assert "tok/s" in out.stderr


def test_help_explains_each_command():
    out = subprocess.run([sys.executable, str(ROOT / "client.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    for command in ("demo", "load", "chat", "complete", "tokenize", "detokenize", "score",
                    "embed", "metrics", "status", "health", "free"):
        assert command in out.stdout


def test_every_subcommand_against_a_live_server(server, tiny_model):
    def client(*args):
        out = subprocess.run([sys.executable, str(ROOT / "client.py"), "--addr", server.addr,
                              *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    assert client("health").strip() == "OK"
    client("load", str(tiny_model))
    assert client("chat", "Hello", "--max-tokens", "4")
    assert client("complete", "Hello", "--max-tokens", "4")
    ids = client("tokenize", "Hello world").strip().strip("[]").split(", ")
    assert client("detokenize", *ids).strip() == "Hello world"
    assert "(per token" in client("score", "Hello", " world", " fox")
    assert client("embed", "Hello").startswith("dim 64")
    assert "tokens_generated" in client("metrics")
    assert "READY" in client("status")
    assert "freed" in client("free")
