"""What the phases of one bench run share: work sizes, the model, the main
server and its prompt book, the raw baseline process, and the result so far."""

import importlib.util
import os
import tempfile
import time
from pathlib import Path

from common import log
from mlx_backend.default_model import default_model_path
from mlx_backend.server_process import ROOT
from prompts import PromptBook
from raw_baseline import RawWorker
from report import fmt
from server import Server
from streams import predict_options, run_stream


class Config:
    """Work sizes. Token counts adapt to the machine (see `fit_tokens`) unless --tokens."""

    def __init__(self, quick: bool, reps=None, tokens=None, kv_context=None):
        self.quick = quick
        self.reps = reps or (1 if quick else 3)
        self.tokens_override = tokens
        self.decode_tokens = tokens or (24 if quick else 64)  # single-stream overhead runs
        self.levels = [1, 4, 8, 16]
        self.conc_tokens = tokens or (16 if quick else 32)  # per stream in the scaling runs
        self.conc_prompt_words = 8
        self.overhead_reps = self.reps if quick else self.reps + 2  # pairs: ~10% needs many
        self.probe_tokens = 64 if quick else 128  # cold prompt of the TTFT-under-load probe
        self.probe_reps = max(2, self.reps)
        self.prefix_tokens = 400 if quick else 1000
        self.cache_reps = 1 if quick else max(2, self.reps - 1)
        self.conversation_reps = 1 if quick else max(3, self.reps)  # runs of 6 new chats
        self.restart_reps = 2 if quick else max(3, self.reps)  # chats per server, cold/warm
        self.bound_requests = 60 if quick else 200
        self.bound_every = 20 if quick else 50
        self.bound_workers = 8
        self.load_reps = 1 if quick else 2
        # Prompt + decode of the KV-bytes runs: ~1k quick; 4k in the full run where
        # prefill is fast enough (see fit_tokens), else 2k (4k of prefill, three
        # times, takes minutes on a small CPU). One run per format: bytes are exact.
        self.kv_context = kv_context or (1024 if quick else 4096)
        self.kv_context_override = kv_context
        self.kv_memory_reps = 1
        self.kv_tokens = tokens or (32 if quick else 64)  # decoded while Status is read
        self.agree_prompts = 3 if quick else 6  # greedy agreement, quantized vs full KV
        self.agree_tokens = 64
        self.kv_stream_tokens = tokens or (32 if quick else 64)  # per stream, KV speed runs
        self.spec_tokens = tokens or (32 if quick else 64)  # single-stream speculative runs
        self.spec_batch_tokens = tokens or (32 if quick else 64)  # per stream, 8 streams
        # on/off pairs at 8 streams: a ratio near 1 on a noisy machine needs several
        self.spec_batch_reps = max(3, self.reps) if quick else self.reps + 2
        self.single_stream_estimate_tps = None

    def fit_tokens(self, tps: float):
        """Scale decode lengths to the measured speed: ~12 s per single-stream run
        and ~5 s of per-stream decode in the scaling runs on slow machines, and
        enough tokens for stable rates on fast ones (a GPU)."""
        self.single_stream_estimate_tps = tps
        if not self.quick and not self.kv_context_override and tps and tps < 40:
            self.kv_context = 2048
        if self.tokens_override or not tps:
            return
        seconds = (4, 2) if self.quick else (8, 5)
        self.decode_tokens = int(min(512, max(self.decode_tokens, tps * seconds[0])))
        self.conc_tokens = int(min(256, max(self.conc_tokens, tps * seconds[1])))
        self.kv_stream_tokens = int(min(256, max(self.kv_stream_tokens, tps * seconds[1])))
        self.spec_tokens = int(min(512, max(self.spec_tokens, tps * seconds[0])))
        self.spec_batch_tokens = int(min(256, max(self.spec_batch_tokens, tps * seconds[1])))

    def as_dict(self):
        return dict(vars(self))


def build_tiny_model(path: Path, **kwargs) -> Path:
    """The tests' tiny random model, loaded from its file: bench stays independent of
    the tests' import setup (conftest, sys.path). `kwargs`: its sizes (hidden_size...)."""
    spec = importlib.util.spec_from_file_location("tiny_model", ROOT / "tests" / "tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tiny_model(path, **kwargs)


class Session:
    def __init__(self, args):
        self.args = args
        self.cfg = Config(args.quick, args.reps, args.tokens, args.kv_context)
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.workdir = Path(tempfile.mkdtemp(prefix="mlx-bench-"))
        self.logdir = Path(args.out) / f"{self.stamp}-logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.servers = []
        self.main = None
        self._worker = None
        self.book = None
        self.context = None
        self.gguf_cache = self.workdir / "gguf-cache"
        self.result = {"measurements": {}, "errors": {}}
        if args.tiny:
            self.model = str(build_tiny_model(self.workdir / "tiny-llama"))
            self.model_label = "tiny random llama (tests/tiny_model.py)"
        else:
            self.model = os.path.abspath(args.model) if args.model else default_model_path()
            self.model_label = os.path.basename(self.model.rstrip("/"))
        self.is_default = not args.tiny and not args.model
        self.budget_text = args.cache_budget or ("8MB" if not args.tiny else "64KB")

    def server(self, name, env=None) -> Server:
        env = dict(env or {})
        env.setdefault("MLX_BACKEND_GGUF_CACHE", str(self.gguf_cache))
        server = Server(self.logdir, name, env)
        self.servers.append(server)
        return server

    def stop_server(self, server):
        server.stop()
        self.result.setdefault("server_exits", {})[server.name] = {
            "returncode": server.returncode,
            "aborted": "terminate called" in server.log_text() or server.returncode not in (0, None),
        }
        if server in self.servers:
            self.servers.remove(server)

    def selected(self, key) -> bool:
        return not self.args.only or key in self.args.only

    def m(self, key) -> dict:
        return self.result["measurements"].setdefault(key, {})

    def worker(self) -> RawWorker:
        """The raw-baseline process, started on first use (overhead and scaling)."""
        if self._worker is None:
            log("starting the raw baseline process (same loader, same LD_PRELOAD as run.sh)")
            self._worker = RawWorker(self.model,
                                     {"MLX_BACKEND_GGUF_CACHE": str(self.gguf_cache)},
                                     self.logdir / "raw-worker.log")
            self.result["raw"] = self._worker.info
        return self._worker

    def stop_worker(self):
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def stream(self, prompt, tokens, **fields):
        return run_stream(self.main.stub, predict_options(prompt, tokens, **fields))

    def prepare(self):
        """Warm the main server up (first request compiles/allocates) and size the
        runs to its measured single-stream speed."""
        self.result["server"] = self.main.blas()
        self.book = PromptBook(self.main.stub)
        warm = self.book.plain(-1)
        self.stream(warm, 8)  # not measured
        self.main.wait_idle()
        res = self.stream(warm, 24)  # a speed estimate to size the runs
        self.main.wait_idle()
        self.cfg.fit_tokens(res.decode_rate())
        log(f"    single-stream estimate {fmt(res.decode_rate())} tok/s: "
            f"{self.cfg.decode_tokens} tokens per overhead run, "
            f"{self.cfg.conc_tokens} per stream in the scaling runs")
        self.result["config"] = self.cfg.as_dict()
