"""6. Prompt cache memory bound: reload with cache_bytes, send many distinct
prompts from 8 workers, and check that the cache's bytes (Status, polled 40
times a second and at checkpoints) never exceed the budget."""

import threading
from concurrent.futures import ThreadPoolExecutor

from common import log
from mlx_backend.options import parse_bytes  # the server's own parser (no MLX import)
from prompts import PromptBook


def run(s):
    out = s.m("cache_bound")
    budget = parse_bytes(s.budget_text)
    out["budget_bytes"] = budget
    out["requests"], out["tokens_per_request"] = s.cfg.bound_requests, 2
    out["concurrent_requests"] = s.cfg.bound_workers
    out["options"] = [f"cache_bytes:{s.budget_text}"]
    reload = s.main.load(s.model, out["options"])
    out["reload_s"] = reload["wall_s"]
    s.book = PromptBook(s.main.stub, seed=99)  # the reload emptied the cache
    prompts = [s.book.plain(10000 + i, 8) for i in range(s.cfg.bound_requests)]
    peak = {"bytes": 0, "entries": 0, "samples": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            status = s.main.status()
            peak["bytes"] = max(peak["bytes"], status.get("prompt_cache", 0))
            peak["entries"] = max(peak["entries"], status.get("prompt_cache_entries", 0))
            peak["samples"] += 1
            stop.wait(0.025)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    checkpoints = []
    errors = []
    try:
        with ThreadPoolExecutor(s.cfg.bound_workers) as pool:
            for start in range(0, len(prompts), s.cfg.bound_every):
                chunk = prompts[start:start + s.cfg.bound_every]
                for res in pool.map(lambda p: s.stream(p, 2), chunk):
                    if res.error:
                        errors.append(res.error)
                s.main.wait_idle()
                status = s.main.status()
                checkpoints.append({"requests": start + len(chunk),
                                    "bytes": status.get("prompt_cache", 0),
                                    "entries": status.get("prompt_cache_entries", 0)})
                log(f"    after {start + len(chunk)} requests: prompt cache "
                    f"{status.get('prompt_cache', 0) / 2**20:.2f} MiB in "
                    f"{status.get('prompt_cache_entries', 0)} entries (budget "
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
