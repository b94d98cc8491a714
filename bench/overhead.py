"""1. Server overhead: single-stream decode tok/s through PredictStream vs raw
mlx_lm.stream_generate on the same weights, loader and BLAS, in back-to-back
pairs whose order alternates, so drift on a noisy machine hits both sides."""

from common import log, median, ratio
from report import fmt


def run(s):
    out = s.m("overhead")
    n = s.cfg.decode_tokens
    worker = s.worker()
    prompt = s.book.plain(0)
    tokens = s.book.tokens(prompt)
    out["prompt_tokens"] = len(tokens)
    out["decode_tokens"] = n
    worker.generate(tokens, 8)  # warm-up
    s.stream(prompt, 8)
    s.main.wait_idle()
    server_runs, raw_runs = [], []
    for rep in range(s.cfg.overhead_reps):
        order = ("server", "raw") if rep % 2 == 0 else ("raw", "server")
        for side in order:
            if side == "server":
                res = s.stream(prompt, n)
                if res.error:
                    raise RuntimeError(res.error)
                final = res.final
                server_runs.append({
                    "tokens": res.tokens, "decode_tps": res.decode_rate(),
                    "ttft_s": res.ttft,
                    "server_tps": (final.tokens / (final.timing_token_generation / 1000)
                                   if final.timing_token_generation else None)})
                s.main.wait_idle()
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
