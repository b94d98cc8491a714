"""14. CPU speed side by side with llama.cpp's server on the same GGUF.

One table for this backend and, when a `llama-server`
binary is found (LLAMA_SERVER, else PATH), for llama.cpp's server started on the
same GGUF (`-np 16`, continuous batching, all cores): single-stream decode
tok/s, 16 simultaneous new requests (aggregate tok/s from send to last token,
decode tok/s while all 16 decode, TTFT p50), and prefill tok/s of a cold
~1k-token prompt (prompt tokens / TTFT). Both get the same prompts (44-144
tokens, different per stream, fresh each repeat), 64 greedy tokens each with
end-of-sequence ignored, and the repeats alternate between the two servers so
drift on a noisy machine hits both. Without llama.cpp the table compares with
the figures llama.cpp's server gave when first measured on the 2-core
reference machine (README, Benchmarks).
"""

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from typing import List, Optional

from common import log, median, ratio
from report import fmt, fmt_ms
from streams import StreamResult, run_streams, summarize_streams

# llama.cpp's server as first measured on the 2-core reference machine.
LLAMA_REFERENCE = {"single_tps": 71.4, "aggregate_tps": 72.0, "decode_tps": 148.3,
                   "ttft_p50_s": 7.4}
TARGETS = {"single_tps": 18.0, "prefill_tps": 250.0}
STREAMS = 16
TOKENS = 64


def find_llama_server() -> Optional[str]:
    path = os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
    return path if path and os.access(path, os.X_OK) else None


class LlamaServer:
    """llama.cpp's server on `gguf`, driven over its HTTP API."""

    def __init__(self, binary: str, gguf: str, log_path, threads: int):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(self.port),
             "-np", str(STREAMS), "-c", str(STREAMS * 2048), "-t", str(threads),
             "--cont-batching"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                raise RuntimeError(f"llama-server exited with {self.proc.returncode} "
                                   f"(log: {log_path})")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("llama-server did not become healthy in 300 s")

    def stream(self, prompt: str, tokens: int, result: StreamResult):
        """One streamed /completion, timed like a PredictStream (streams.py)."""
        body = json.dumps({"prompt": prompt, "n_predict": tokens, "temperature": 0,
                           "ignore_eos": True, "stream": True, "cache_prompt": False}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=body,
                                         headers={"Content-Type": "application/json"})
        result.sent = time.perf_counter()
        count = 0
        try:
            with urllib.request.urlopen(request, timeout=900) as reply:
                for line in reply:
                    if not line.startswith(b"data: "):
                        continue
                    now = time.perf_counter()
                    data = json.loads(line[6:])
                    if data.get("content"):
                        count += 1
                        result.first_text = result.first_text or now
                    if data.get("stop"):
                        timings = data.get("timings", {})
                        count = timings.get("predicted_n", count)
                        result.prompt_tokens = timings.get("prompt_n")
                    result.points.append((now, count))
            result.finished = True
        except OSError as err:
            result.error = f"llama-server: {err}"

    def run(self, prompts: List[str], tokens: int) -> List[StreamResult]:
        results = [StreamResult() for _ in prompts]
        threads = [threading.Thread(target=self.stream, args=(p, tokens, r), daemon=True)
                   for p, r in zip(prompts, results)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        errors = [r.error for r in results if r.error]
        if errors:
            raise RuntimeError(errors[0])
        return results

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def measure(summary: dict) -> dict:
    """The table's figures from summarize_streams() of streams sent together."""
    if summary["streams"] == 1:
        prompt_tokens = summary["prompt_tokens"][0]
        return {"single_tps": summary.get("per_stream_tps"),
                "prefill_tps": ratio(prompt_tokens, summary.get("ttft_s_median"))}
    return {"aggregate_tps": summary["wall_tps"], "decode_tps": summary["steady_tps"],
            "ttft_p50_s": summary.get("ttft_s_median"),
            "prompt_tokens": summary["prompt_tokens"]}


def run(s):
    out = s.m("cpu_speed")
    binary = find_llama_server()
    is_gguf = s.model.endswith(".gguf")
    out["llama_server"] = binary if binary and is_gguf else None
    if binary and not is_gguf:
        out["llama_note"] = "llama-server needs a GGUF; the model is a folder"
    elif not binary:
        out["llama_note"] = "no llama-server (set LLAMA_SERVER or put it on PATH)"
    llama = None
    if out["llama_server"]:
        log(f"    starting {binary} on the same GGUF")
        llama = LlamaServer(binary, s.model, s.logdir / "llama-server.log", os.cpu_count() or 1)
        llama.run([s.book.plain(8999, 16)] * 2, 8)  # unmeasured, as the main server's warm-up
    tokens = TOKENS if not s.cfg.quick else 24
    runs = {"ours": [], "llama": []}
    counter = 9000
    try:
        for rep in range(s.cfg.reps):
            one, many = [], []
            for i in range(STREAMS + 1):
                counter += 1
                words = 32 + (80 * i) // STREAMS  # ~44-144 tokens
                (one if i == 0 else many).append(s.book.plain(counter, words))
            long = s.book.cold(s.book.text_of_tokens(1000 if not s.cfg.quick else 400))
            sides = [("ours", lambda p, n: run_streams(s.main, p, n, "cpu_speed"))]
            if llama is not None:
                sides.append(("llama", lambda p, n: summarize_streams(llama.run(p, n))))
            if rep % 2:
                sides.reverse()
            for side, fn in sides:
                got = {**measure(fn(one, tokens)), **measure(fn(many, tokens))}
                got["prefill_tps"] = measure(fn([long], 1))["prefill_tps"]
                runs[side].append(got)
                log(f"    rep {rep} {side}: 1 stream {fmt(got['single_tps'])} tok/s; 16: "
                    f"aggregate {fmt(got['aggregate_tps'])}, decode {fmt(got['decode_tps'])}, "
                    f"TTFT p50 {fmt_ms(got['ttft_p50_s'])}; prefill {fmt(got['prefill_tps'])} "
                    f"tok/s")
    finally:
        if llama is not None:
            llama.stop()
    keys = ("single_tps", "aggregate_tps", "decode_tps", "ttft_p50_s", "prefill_tps")
    for side, got in runs.items():
        if got:
            out[side] = {k: median([g[k] for g in got]) for k in keys}
            out[side]["runs"] = got
    lengths = [n for g in runs["ours"] for n in g["prompt_tokens"]]
    out["prompt_tokens_range"] = [min(lengths), max(lengths)] if lengths else None
    out["tokens"] = tokens
    ref = out.get("llama") or LLAMA_REFERENCE
    out["versus"] = "measured" if "llama" in out else "reference"
    o = out["ours"]
    def at_least(value, floor):
        return value is not None and floor is not None and value >= floor

    out["checks"] = {
        "single_tps": at_least(o["single_tps"], TARGETS["single_tps"]),
        "prefill_tps": at_least(o["prefill_tps"], TARGETS["prefill_tps"]),
        "aggregate_tps": at_least(o["aggregate_tps"], ref["aggregate_tps"]),
        "ttft_p50_s": at_least(ref["ttft_p50_s"], o["ttft_p50_s"]),
    }
    out["pass"] = all(out["checks"].values())


def rows(c) -> list:
    """Rows of the report's table (report.py)."""
    o, ref = c.get("ours", {}), c.get("llama") or LLAMA_REFERENCE
    checks = c.get("checks", {})
    lo_hi = c.get("prompt_tokens_range") or ["?", "?"]
    if c.get("versus") == "measured":
        label = "llama.cpp's server (-np 16, same GGUF)"
    else:
        label = f"llama.cpp as first measured ({c.get('llama_note', '')})"
    result = [("14", f"CPU speed: this backend / {label}", "", "", ""),
              ("", "  prompt tokens, greedy tokens per request",
               f"{lo_hi[0]}-{lo_hi[1]}, {c.get('tokens')}", "", "")]

    def row(name, key, show, target, ok):
        times = ratio(o.get(key), ref.get(key))
        value = f"{show(o.get(key))} / {show(ref.get(key))}" + \
            (f" ({times:.2f}x)" if times is not None else "")
        result.append(("", f"  {name}", value, target,
                       "" if ok is None else ("PASS" if ok else "FAIL")))

    row("1 stream decode tok/s", "single_tps", fmt, ">= 18", checks.get("single_tps"))
    row("16 new streams: aggregate tok/s (send to last token)", "aggregate_tps", fmt,
        ">= llama.cpp", checks.get("aggregate_tps"))
    row("16 new streams: decode tok/s while all decode", "decode_tps", fmt, "", None)
    row("16 new streams: TTFT p50", "ttft_p50_s", fmt_ms, "<= llama.cpp",
        checks.get("ttft_p50_s"))
    row("prefill tok/s, cold ~1k-token prompt (tokens / TTFT)", "prefill_tps",
        lambda v: fmt(v, ".0f"), ">= 250", checks.get("prefill_tps"))
    return result
