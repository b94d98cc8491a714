"""2. Scaling: aggregate decode tok/s at 1, 4, 8 and 16 concurrent streams, with
the CPU the server and the bench client used, and the same 16 prompts through
raw mlx-lm's BatchGenerator for context. Health latency (health.py) is sampled
during these runs."""

import time

import health
from common import log, median, percentile, ratio
from machine import own_cpu_s, process_cpu_s
from report import fmt
from streams import Background, predict_options, summarize_streams


def run(s):
    out = s.m("concurrency")
    n_tokens = s.cfg.conc_tokens
    out["tokens_per_stream"] = n_tokens
    runs = {n: [] for n in s.cfg.levels}
    lats = {n: [] for n in s.cfg.levels}
    top_level = s.cfg.levels[-1]
    raw_runs = []
    worker = s.worker() if not s.args.no_raw_batch else None
    poller = health.HealthPoller(s.main.addr, 0.02)
    counter = 1000
    try:
        for rep in range(s.cfg.reps):
            for n in s.cfg.levels:
                prompts = []
                for _ in range(n):
                    counter += 1
                    prompts.append(s.book.plain(counter, s.cfg.conc_prompt_words))
                cpu0 = (process_cpu_s(s.main.proc.pid), own_cpu_s(), time.perf_counter())
                bg = Background(s.main.stub, [predict_options(p, n_tokens) for p in prompts])
                bg.join()
                cpu1 = (process_cpu_s(s.main.proc.pid), own_cpu_s(), time.perf_counter())
                if bg.errors():
                    raise RuntimeError(f"{n} streams: {bg.errors()[0]}")
                summary = summarize_streams(bg.results)
                wall = cpu1[2] - cpu0[2]
                summary["server_cpu_cores"] = ratio(cpu1[0] - cpu0[0], wall) \
                    if cpu0[0] is not None and cpu1[0] is not None else None
                summary["bench_client_cpu_cores"] = ratio(cpu1[1] - cpu0[1], wall)
                lat = poller.between(summary["phase_start"], summary["phase_end"])
                lats[n].extend(lat)
                summary["health_samples"] = len(lat)
                runs[n].append(summary)
                log(f"    rep {rep} {n:2d} streams: steady {fmt(summary['steady_tps'])} tok/s, "
                    f"phase {fmt(summary['phase_tps'])} tok/s, health p95 "
                    f"{fmt(percentile(lat, 95) and percentile(lat, 95) * 1000, '.1f', ' ms')}"
                    f", CPU cores used: server {fmt(summary['server_cpu_cores'], '.2f')}, "
                    f"bench client {fmt(summary['bench_client_cpu_cores'], '.2f')}")
                s.main.wait_idle()
                if n == top_level and worker is not None:
                    # The same prompts through mlx-lm's BatchGenerator without the
                    # server, right after, so both see the same machine.
                    raw = worker.batch([s.book.tokens(p) for p in prompts], n_tokens)
                    raw_runs.append(raw)
                    log(f"    rep {rep} {n:2d} prompts, raw BatchGenerator: steady "
                        f"{fmt(raw['steady_tps'])} tok/s, phase {fmt(raw['phase_tps'])} tok/s")
    finally:
        poller.stop()
        s.stop_worker()
    levels = {}
    for n in s.cfg.levels:
        levels[str(n)] = {
            "aggregate_tps": median([r["steady_tps"] or r["phase_tps"] for r in runs[n]]),
            "steady_tps": median([r["steady_tps"] for r in runs[n]]),
            "phase_tps": median([r["phase_tps"] for r in runs[n]]),
            "per_stream_tps": median([r["per_stream_tps"] for r in runs[n]]),
            # the N requests are sent at once: time to first token of new requests
            "ttft_p50_s": median([r.get("ttft_s_median") for r in runs[n]]),
            **health.latency(lats[n]),
            "runs": runs[n],
        }
    out["levels"] = levels
    if raw_runs:
        out["raw_batch_runs"] = raw_runs
        out["raw_batch_top_tps"] = median([r["steady_tps"] or r["phase_tps"] for r in raw_runs])
        out["server_vs_raw_batch_top"] = ratio(levels[str(top_level)]["aggregate_tps"],
                                               out["raw_batch_top_tps"])
    one = levels["1"]["aggregate_tps"]
    top = levels[str(s.cfg.levels[-1])]["aggregate_tps"]
    out["ratio_16_to_1"] = ratio(top, one)
    out["pass"] = out["ratio_16_to_1"] is not None and out["ratio_16_to_1"] >= 5
    health.record(s, levels, poller)
