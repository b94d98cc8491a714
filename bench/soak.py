#!/usr/bin/env python3
"""Soak: N minutes of mixed traffic against one server, then a report.

Mixed traffic: chats sharing a system prompt, raw completions, streams that
are cancelled at random points, scores, tokenizations, health checks and
deliberately bad requests. Reports requests served, errors by status code,
the server's resident memory and prompt-cache bytes at the start and end.

  .venv/bin/python bench/soak.py --minutes 10            (make soak)
"""

import argparse
import collections
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

import backend_pb2
from mlx_backend.default_model import default_model_path
from mlx_backend.server_process import ServerProcess

H = backend_pb2.HealthMessage()
M = backend_pb2.Message
SYSTEM = "You are a helpful assistant who answers in one short sentence."
QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?",
             "Who wrote Hamlet?", "What is water made of?", "Name a planet."]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def snapshot(server) -> dict:
    breakdown = server.stub.Status(H).memory.breakdown
    return {"rss_mb": round(rss_bytes(server.proc.pid) / 2**20, 1),
            "prompt_cache_mb": round(breakdown["prompt_cache"] / 2**20, 2),
            "prompt_cache_entries": breakdown["prompt_cache_entries"],
            "mlx_active_mb": round(breakdown["mlx_active"] / 2**20, 1),
            "mlx_buffer_cache_mb": round(breakdown["mlx_buffer_cache"] / 2**20, 1)}


def one_request(stub, rng):
    kind = rng.choice(["chat", "chat", "complete", "stream_cancel", "score", "tokenize",
                       "health", "bad"])
    if kind == "chat":
        stub.Predict(backend_pb2.PredictOptions(
            Messages=[M(role="system", content=SYSTEM),
                      M(role="user", content=rng.choice(QUESTIONS))],
            UseTokenizerTemplate=True, Tokens=rng.randint(8, 48),
            Temperature=rng.choice([0.0, 0.7]), TopP=0.9), timeout=300)
    elif kind == "complete":
        stub.Predict(backend_pb2.PredictOptions(
            Prompt=f"Story {rng.randint(0, 10**6)}: once upon a time",
            Tokens=rng.randint(4, 32), StopPrompts=["."]), timeout=300)
    elif kind == "stream_cancel":
        call = stub.PredictStream(backend_pb2.PredictOptions(
            Prompt="List some fruits:", Tokens=200, IgnoreEOS=True), timeout=300)
        for i, _ in enumerate(call):
            if i >= rng.randint(0, 8):
                break
        call.cancel()
    elif kind == "score":
        stub.Score(backend_pb2.ScoreRequest(prompt="The capital of France is",
                                            candidates=[" Paris", " London"]), timeout=300)
    elif kind == "tokenize":
        stub.TokenizeString(backend_pb2.PredictOptions(Prompt="Hello world"), timeout=60)
    elif kind == "health":
        stub.Health(H, timeout=10)
    else:
        stub.Predict(backend_pb2.PredictOptions(Prompt="hi", TopP=7.0), timeout=60)
    return kind


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2 GGUF")
    parser.add_argument("--cache-bytes", default="64MB")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    server = ServerProcess(tmp, env={"MLX_BACKEND_GGUF_CACHE": os.environ.get(
        "MLX_BACKEND_GGUF_CACHE", str(Path.home() / ".cache/mlx-backend/gguf"))})
    server.load(args.model or default_model_path(),
                options=[f"cache_bytes:{args.cache_bytes}", "max_cache_entries:64"])
    start = snapshot(server)
    served = collections.Counter()
    codes = collections.Counter()
    lock = threading.Lock()
    deadline = time.time() + args.minutes * 60

    def worker(seed):
        rng = random.Random(seed)
        while time.time() < deadline:
            try:
                kind = one_request(server.stub, rng)
                code = "OK"
            except grpc.RpcError as err:
                kind, code = "error", err.code().name
            with lock:
                served[kind] += 1
                codes[code] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.workers)]
    began = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(1)
    end = snapshot(server)
    server.stop()
    report = {"minutes": round((time.time() - began) / 60, 2), "workers": args.workers,
              "requests": sum(codes.values()), "by_kind": dict(served),
              "status_codes": dict(codes), "start": start, "end": end}
    print(json.dumps(report, indent=2))
    unexpected = {c for c in codes if c not in ("OK", "INVALID_ARGUMENT", "CANCELLED")}
    if unexpected:
        print(f"unexpected status codes: {sorted(unexpected)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
