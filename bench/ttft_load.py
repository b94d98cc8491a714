"""3. TTFT under load: a cold prompt's time to first token while 8 streams
decode vs idle. Idle probes run before and after the loaded ones, so drift
affects both; every probe is cold (checked with GetMetrics)."""

import time

from common import log, median, ratio
from report import fmt
from streams import Background, predict_options


def run(s):
    out = s.m("ttft_load")
    body = s.book.text_of_tokens(s.cfg.probe_tokens)
    probe_tokens = 4
    idle, loaded = [], []

    def probe(into, label):
        prompt = s.book.cold(body)
        res = s.stream(prompt, probe_tokens)
        if res.error:
            raise RuntimeError(res.error)
        item = {"ttft_s": res.ttft, "server_prompt_ms": res.final.timing_prompt_processing,
                "prompt_tokens": res.final.prompt_tokens}
        # The probe ends first (background streams run until cancelled, which
        # does not touch the metrics), so GetMetrics describes the probe.
        item["prompt_tokens_processed"] = s.main.metrics().prompt_tokens_processed
        into.append(item)
        log(f"    {label} probe: TTFT {fmt(res.ttft, '.3f', ' s')} "
            f"(server {fmt(item['server_prompt_ms'], '.0f', ' ms')})")
        return res

    before = (s.cfg.probe_reps + 1) // 2
    for _ in range(before):
        probe(idle, "idle")
        s.main.wait_idle()
    counter = 5000
    prompts = []
    for _ in range(8):
        counter += 1
        prompts.append(s.book.plain(counter, s.cfg.conc_prompt_words))
    budget = max(64, s.context - 128)  # decode "forever"; cancelled when done
    bg = Background(s.main.stub, [predict_options(p, budget) for p in prompts])
    try:
        if not bg.wait_all_decoding():
            raise RuntimeError("background streams did not start decoding")
        time.sleep(0.5)
        progress_before = sum(r.tokens for r in bg.results)
        t_start = time.perf_counter()
        for _ in range(s.cfg.probe_reps):
            probe(loaded, "under 8 streams")
            time.sleep(0.2)
        t_end = time.perf_counter()
        still = sum(1 for r in bg.results if not r.finished and not r.error)
        progress = sum(r.tokens for r in bg.results) - progress_before
    finally:
        bg.cancel()
    s.main.wait_idle()
    for _ in range(s.cfg.probe_reps - before):
        probe(idle, "idle")
        s.main.wait_idle()
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
