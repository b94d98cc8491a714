"""The README's main command: `client.py demo` starts a server, loads the
default model and streams an answer."""

import subprocess
import sys

from conftest import ROOT, free_port


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
    for command in ("demo", "load", "chat", "complete", "tokenize", "score", "status",
                    "health"):
        assert command in out.stdout
