"""10. Quantized KV cache (LoadModel `kv_bits:8|4`): memory, fidelity and speed
against the full-precision cache, on servers loaded side by side in one run.

Three servers load the same model: full-precision KV, `kv_bits:8` and
`kv_bits:4` (group 64; 32 if the head dimension needs it), all with
`prompt_cache:false`, so MLX's memory holds only the weights and the running
batch. Measured, the configurations interleaved within each repeat:

  1. KV bytes per token at a long context (~1k tokens in --quick; 4k in the full
     run, or 2k where the machine decodes under 40 tok/s, since three 4k
     prefills take minutes on a small CPU; --kv-context sets it): one stream per
     format (the bytes are exact; its TTFT and decode rate are context) decodes
     behind a cold prompt while Status is read every 50 ms; `kv_cache` (the
     running batch's KV state, measured after each step) over the tokens it then
     holds. The buffers grow in 256-position steps; the context ends just under
     a multiple of 256, so the slack is a few positions, the same for every
     format. Second view: MLX active memory minus the weights, at the same
     moment (it also holds the step's temporaries).
  2. Greedy agreement with the full-precision cache: a few prompts, 64 tokens
     each (token ids from Predict's logprobs); how many agree fully, and the
     mean length of the common prefix.
  3. Aggregate decode tok/s at 1 and 8 streams, 8-bit vs full precision. On the
     CPU MLX's quantized attention is not BLAS-backed, so it may be slower: it is
     reported as measured, with no target.

With --tiny the tests' tiny model is too narrow to quantize (head dimension 16;
MLX groups are 32 or more), so a wider one (hidden 256, head dimension 64) is
built for this phase.
"""

import json
import threading
import time
from typing import List

from common import log, median, ratio
from load_time import context_length
from prompts import PromptBook
from report import fmt
from streams import predict_options, run_stream, run_streams, warm_up

CONFIGS = (("full", None), ("kv8", 8), ("kv4", 4))
GROUP_SIZES = (64, 32)  # the default first; 32 when the head dimension needs it
BASE_OPTIONS = ["prompt_cache:false"]
STATUS_KEYS = ("kv_cache", "mlx_active", "weights", "draft_weights", "prompt_cache")
# Ordinary text, so greedy continuations follow the model's own preferences
# (random filler makes near-ties, where any rounding flips a token).
AGREE_PROMPTS = (
    "The history of the printing press begins in the fifteenth century, when",
    "Here is a simple recipe for tomato soup. First, you will need",
    "Photosynthesis is the process by which green plants",
    "The three largest planets in the solar system are",
    "Dear hiring manager, I am writing to apply for the position of",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The water cycle describes how water moves between the oceans, the air and",
    "Once upon a time, in a small village at the edge of a forest, there lived",
)
TARGET_RATIOS = {"kv8": 0.55, "kv4": 0.35}


class StatusPoller:
    """Read a server's Status every `interval` seconds; keep (time, breakdown)."""

    def __init__(self, server, interval: float = 0.05):
        self.server = server
        self.interval = interval
        self.samples: List[tuple] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                status = self.server.status()
                self.samples.append((time.perf_counter(),
                                     {k: status.get(k, 0) for k in STATUS_KEYS}))
            except Exception:
                pass
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join(10)


def model_for(s) -> str:
    if not s.args.tiny:
        return s.model
    from session import build_tiny_model  # imports MLX, as --tiny's own build does
    return str(build_tiny_model(s.workdir / "tiny-wide", hidden_size=256))


def start_servers(s, model: str, servers: dict):
    """Fill `servers`: name -> (server, options, load result); the quantized ones
    at the first group size the model's head dimension accepts."""
    group = None
    for name, bits in CONFIGS:
        server = s.server(f"kv-{name}")
        servers[name] = (server, None, None)
        candidates = [None] if bits is None else ([group] if group else GROUP_SIZES)
        for size in candidates:
            options = BASE_OPTIONS + ([] if bits is None else
                                      [f"kv_bits:{bits}", f"kv_group_size:{size}"])
            try:
                loaded = server.load(model, options)
            except RuntimeError as err:
                if size != candidates[-1] and "kv_group_size" in str(err):
                    continue
                raise
            group = group or size
            servers[name] = (server, options, loaded)
            log(f"    {name}: {' '.join(options)}: {loaded['message']}")
            break


def kv_run(server, prompt: str, tokens: int) -> dict:
    """One stream behind a long prompt, Status read while it decodes."""
    poller = StatusPoller(server)
    try:
        res = run_stream(server.stub, predict_options(prompt, tokens))
    finally:
        poller.stop()
    server.wait_idle()
    if res.error:
        raise RuntimeError(res.error)
    prompt_tokens = res.final.prompt_tokens
    usable = [(t, b) for t, b in poller.samples
              if b["kv_cache"] > 0 and res.tokens_at(t) >= 1]
    out = {"prompt_tokens": prompt_tokens, "decode_tps": res.decode_rate(), "ttft_s": res.ttft,
           "server_prompt_ms": res.final.timing_prompt_processing,
           "status_samples": len(poller.samples), "usable_samples": len(usable)}
    if not usable:
        return out
    t, b = usable[-1]  # the most tokens held: the least allocation slack per token
    held = prompt_tokens + res.tokens_at(t)
    other = b["mlx_active"] - b["weights"] - b["draft_weights"] - b["prompt_cache"]
    out.update({"tokens_held": held, "kv_cache_bytes": b["kv_cache"],
                "kv_bytes_per_token": b["kv_cache"] / held,
                "mlx_active_bytes": b["mlx_active"], "weights_bytes": b["weights"],
                "active_minus_weights_bytes": other,
                "active_minus_weights_per_token": other / held,
                "kv_cache_bytes_peak": max(b2["kv_cache"] for _, b2 in usable)})
    return out


def long_prompt(book, limit: int) -> str:
    """A cold prompt of at most `limit` tokens (opener included), close to it: the
    KV buffers grow in 256-position steps, so a context that ends just under a
    multiple of 256 carries almost no slack."""
    want = limit - 8
    for _ in range(4):
        prompt = book.cold(book.text_of_tokens(want))
        over = len(book.tokens(prompt)) - limit
        if over <= 0:
            return prompt
        want -= over + 2
    raise RuntimeError(f"could not build a prompt of at most {limit} tokens")


def memory(s, servers, book, out, model_context: int):
    context = min(s.cfg.kv_context, model_context)
    tokens = s.cfg.kv_tokens
    runs = {name: [] for name in servers}
    for rep in range(s.cfg.kv_memory_reps):
        prompt = long_prompt(book, context - tokens - 4)
        order = list(servers) if rep % 2 == 0 else list(reversed(servers))
        for name in order:
            r = kv_run(servers[name][0], prompt, tokens)
            runs[name].append(r)
            log(f"    rep {rep} {name}: {r['prompt_tokens']}-token prompt, KV "
                f"{fmt(r.get('kv_bytes_per_token'), '.0f')} B/token "
                f"(active-weights {fmt(r.get('active_minus_weights_per_token'), '.0f')}),"
                f" TTFT {fmt(r['ttft_s'], '.1f', ' s')}, decode {fmt(r['decode_tps'])} tok/s")
    res = {"context_tokens": context, "decode_tokens": tokens, "runs": runs}
    over = [r["prompt_tokens"] + tokens for rs in runs.values() for r in rs
            if r["prompt_tokens"] + tokens > context]
    if over:
        out["warning"] = (f"KV-bytes runs held up to {max(over)} tokens, over the intended "
                          f"{context}: their buffers may carry up to 256 positions of slack")
    for name in servers:
        res[name] = {key: median([r.get(key) for r in runs[name]]) for key in
                     ("prompt_tokens", "tokens_held", "kv_bytes_per_token",
                      "active_minus_weights_per_token", "decode_tps", "ttft_s")}
    full = res["full"]
    for name, limit in TARGET_RATIOS.items():
        if name not in res:
            continue
        q = res[name]
        q["ratio"] = ratio(q["kv_bytes_per_token"], full["kv_bytes_per_token"])
        q["ratio_active"] = ratio(q["active_minus_weights_per_token"],
                                  full["active_minus_weights_per_token"])
        q["decode_ratio"] = ratio(q["decode_tps"], full["decode_tps"])
        q["pass"] = q["ratio"] is not None and q["ratio"] <= limit
    out["memory"] = res


def greedy_ids(server, prompt: str, tokens: int) -> List[int]:
    reply = server.stub.Predict(predict_options(prompt, tokens, Logprobs=1), timeout=900)
    return [entry["id"] for entry in json.loads(reply.logprobs)["content"]]


def common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(s, servers, out):
    prompts = list(AGREE_PROMPTS[:s.cfg.agree_prompts])
    tokens = s.cfg.agree_tokens
    ids = {name: [] for name in servers}
    for prompt in prompts:
        for name, (server, _, _) in servers.items():
            ids[name].append(greedy_ids(server, prompt, tokens))
            server.wait_idle()
    res = {"prompts": len(prompts), "tokens": tokens, "ids": ids}
    for name in servers:
        if name == "full":
            continue
        prefixes = [common_prefix(q, f) for q, f in zip(ids[name], ids["full"])]
        res[name] = {
            "common_prefix": prefixes,
            "agree_fully": sum(q == f for q, f in zip(ids[name], ids["full"])),
            "mean_common_prefix": sum(prefixes) / len(prefixes) if prefixes else None,
        }
        log(f"    {name}: {res[name]['agree_fully']}/{len(prompts)} prompts agree over "
            f"{tokens} tokens; common prefixes {prefixes}")
    out["agreement"] = res


def speed(s, servers, book, out):
    tokens = s.cfg.kv_stream_tokens
    names = ["full", "kv8"]
    levels = [1, 8]
    runs = {name: {str(n): [] for n in levels} for name in names}
    counter = 5000
    for rep in range(s.cfg.reps):
        for n in levels:
            order = names if rep % 2 == 0 else list(reversed(names))
            for name in order:
                server = servers[name][0]
                prompts = []
                for _ in range(n):
                    counter += 1
                    prompts.append(book.plain(counter, s.cfg.conc_prompt_words))
                summary = run_streams(server, prompts, tokens, f"{name}, {n} streams")
                runs[name][str(n)].append(summary)
                log(f"    rep {rep} {name} {n} stream{'s' * (n > 1)}: "
                    f"{fmt(summary['aggregate_tps'])} tok/s")
    res = {"tokens_per_stream": tokens, "runs": runs}
    for n in levels:
        key = str(n)
        lv = {name: median([r["aggregate_tps"] for r in runs[name][key]]) for name in names}
        lv["ratio"] = ratio(lv["kv8"], lv["full"])
        res[key] = lv
    out["speed"] = res


def run(s):
    out = s.m("kv_quant")
    model = model_for(s)
    servers = {}
    try:
        start_servers(s, model, servers)
        out["model"] = model if s.args.tiny else s.model_label
        out["options"] = {name: opts for name, (_, opts, _) in servers.items()}
        first = servers["full"][0]
        book = PromptBook(first.stub, seed=4321)
        warm = [book.plain(-10 - i) for i in range(8)]
        for server, _, _ in servers.values():
            warm_up(server, warm)
        context = context_length(servers["full"][2]["message"])
        memory(s, servers, book, out, context)
        agreement(s, servers, out)
        speed(s, servers, book, out)
    finally:
        for server, _, _ in servers.values():
            s.stop_server(server)
    mem = out.get("memory", {})
    out["pass"] = all(mem.get(name, {}).get("pass") for name in TARGET_RATIOS)
