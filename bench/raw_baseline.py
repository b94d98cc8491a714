"""The bench side of raw_worker.py: the raw mlx-lm baseline in a subprocess with
run.sh's environment, driven over raw_worker.py's line protocol."""

import json
import subprocess
from pathlib import Path

from machine import env_like_run_sh, project_python


class RawWorker:
    def __init__(self, model: str, env_extra: dict, log_path: Path):
        self._stderr = open(log_path, "w")
        self.proc = subprocess.Popen(
            [project_python(), str(Path(__file__).resolve().parent / "raw_worker.py"),
             "--model", model],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            env=env_like_run_sh(env_extra))
        line = self.proc.stdout.readline()
        if not line:
            self.stop()
            raise RuntimeError(f"raw worker exited: {log_path.read_text()[-3000:]}")
        self.info = json.loads(line)

    def generate(self, tokens, max_tokens) -> dict:
        return self._ask({"tokens": tokens, "max_tokens": max_tokens})

    def batch(self, prompts, max_tokens) -> dict:
        return self._ask({"batch": prompts, "max_tokens": max_tokens})

    def _ask(self, message: dict) -> dict:
        """One request line to the worker, one reply line back."""
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("raw worker died")
        return json.loads(line)

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
