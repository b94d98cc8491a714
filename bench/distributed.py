"""12. One model across 2 ranks (mx.distributed ring on 127.0.0.1) vs one process.

Aggregate decode tok/s at 1 and 8 streams, the two sides interleaved; and the
communication of each decode step: the tick rank 0 shares before every step
(bytes and ms, measured from Status' `distributed_*` counters) plus the
model's own collectives (computed from its shapes: a pipeline step sends the
hidden state of each row to the next stage and all-gathers the last stage's;
a tensor step all-sums twice per layer). On one 2-core machine the ranks share
the cores, so this is slower than one process; the per-step volume is what
tells how real hosts would scale (see README, "Several machines").
"""

import json

from common import log, median, ratio
from mlx_backend.server_process import start_worker, write_hostfile
from report import fmt
from streams import run_streams, warm_up

LEVELS = (1, 8)
RANKS = 2


def model_collective_bytes(config: dict, parallel: str, rows: int) -> int:
    """Bytes rank 0 receives through the model's collectives in one decode step."""
    hidden = config["hidden_size"] * 4  # float32 activations on the CPU
    if parallel == "pipeline":  # one send from the previous stage, one all_gather
        return rows * hidden * (1 + (RANKS - 1))
    # tensor: an all_sum after attention and after the MLP, in every layer
    return 2 * config["num_hidden_layers"] * rows * hidden * (RANKS - 1)


def _model_config(s) -> dict:
    """config.json of the model: its folder's, or the GGUF import's."""
    from pathlib import Path

    for path in [Path(s.model) / "config.json"] + sorted(s.gguf_cache.glob("*/config.json")):
        if path.exists():
            return json.loads(path.read_text())
    return {}


def run(s):
    out = s.m("distributed")
    parallel = "pipeline"  # SmolLM2's 9 query / 3 KV heads do not split in 2
    hostfile = write_hostfile(s.workdir / "hosts.json", RANKS)
    env = {"MLX_BACKEND_GGUF_CACHE": str(s.gguf_cache)}
    worker = start_worker(hostfile, 1, env, open(s.logdir / "worker.log", "w"))
    servers = []
    try:
        single = s.server("one-process")
        servers.append(single)
        single.load(s.model)
        rank0 = s.server("rank0")
        servers.append(rank0)
        loaded = rank0.load(s.model, options=[f"hostfile:{hostfile}", f"parallel:{parallel}"])
        out.update(parallel=parallel, ranks=RANKS, load_s=loaded["wall_s"])
        warm = [s.book.plain(-40 - i) for i in range(max(LEVELS))]
        for server in servers:
            warm_up(server, warm)
        tokens = s.cfg.conc_tokens
        runs = {n: {"one": [], "two": []} for n in LEVELS}
        comm = {n: [] for n in LEVELS}
        counter = 9000
        for rep in range(s.cfg.reps):
            for n in LEVELS:
                sides = (("one", single), ("two", rank0))
                for name, server in (sides if rep % 2 == 0 else reversed(sides)):
                    prompts = []
                    for _ in range(n):
                        counter += 1
                        prompts.append(s.book.plain(counter, s.cfg.conc_prompt_words))
                    before = server.status()
                    summary = run_streams(server, prompts, tokens, f"{name}, {n} streams")
                    after = server.status()
                    runs[n][name].append(summary["aggregate_tps"])
                    if name == "two":
                        ticks = after["distributed_ticks"] - before["distributed_ticks"]
                        comm[n].append({
                            "ticks": ticks,
                            "tick_bytes": (after["distributed_tick_bytes"]
                                           - before["distributed_tick_bytes"]) / max(ticks, 1),
                            "tick_ms": (after["distributed_tick_us"]
                                        - before["distributed_tick_us"]) / 1000 / max(ticks, 1)})
                    side = "2 ranks" if name == "two" else "1 process"
                    log(f"    rep {rep} {n} stream(s), {side}: "
                        f"{fmt(summary['aggregate_tps'])} tok/s")
        config = _model_config(s)
        levels = {}
        for n in LEVELS:
            one, two = median(runs[n]["one"]), median(runs[n]["two"])
            levels[str(n)] = {
                "one_process_tps": one, "two_ranks_tps": two, "ratio": ratio(two, one),
                "tick_bytes": median([c["tick_bytes"] for c in comm[n]]),
                "tick_ms": median([c["tick_ms"] for c in comm[n]]),
                "model_bytes": model_collective_bytes(config, parallel, n) if config else None,
                "runs": runs[n], "comm": comm[n]}
        out.update(levels=levels, tokens_per_stream=tokens,
                   tensor_model_bytes_8=(model_collective_bytes(config, "tensor", 8)
                                         if config else None))
    finally:
        for server in servers:
            s.stop_server(server)
        try:
            out["worker_exit"] = worker.wait(timeout=30)
        except Exception:
            worker.kill()
            out["worker_exit"] = "killed"

