"""5. Prompt cache: TTFT of a prompt behind a long prefix nobody sent before
(cold) vs the same prefix with another suffix right after (warm)."""

from common import log, median, ratio
from report import fmt


def run(s):
    out = s.m("prompt_cache")
    cold, warm = [], []
    shared = []
    for rep in range(s.cfg.cache_reps):
        prefix = s.book.cold(s.book.text_of_tokens(s.cfg.prefix_tokens))
        shared.append(len(s.book.tokens(prefix)))
        for into, suffix in ((cold, f"\n\nQuestion {rep}: what happens next?"),
                             (warm, f"\n\nQuestion {rep}: who is the main character?")):
            res = s.stream(prefix + suffix, 4)
            if res.error:
                raise RuntimeError(res.error)
            metrics = s.main.metrics()
            into.append({"ttft_s": res.ttft,
                         "server_prompt_ms": res.final.timing_prompt_processing,
                         "prompt_tokens": res.final.prompt_tokens,
                         "prompt_tokens_processed": metrics.prompt_tokens_processed})
            log(f"    {'cold' if into is cold else 'warm'}: TTFT {fmt(res.ttft, '.3f', ' s')}"
                f", server {res.final.timing_prompt_processing:.0f} ms, processed "
                f"{metrics.prompt_tokens_processed}/{res.final.prompt_tokens} tokens")
            s.main.wait_idle()
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
