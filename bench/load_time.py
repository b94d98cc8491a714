"""7. LoadModel time of a GGUF: the first import into a fresh cache dir vs a new
server loading the cached conversion. Runs first because it also starts the
main server every later phase uses (the last cached server)."""

import re

from common import median
from mlx_backend.gguf import is_gguf  # numpy, no MLX


def context_length(message: str) -> int:
    """The context the server reported in its LoadModel message (2048 if absent)."""
    found = re.search(r"context (\d+)", message)
    return int(found.group(1)) if found else 2048


def run(s):
    out = s.m("load_time")
    out["model_is_gguf"] = is_gguf(s.model)
    first, cached, healthy = [], [], []
    if not s.selected("load_time"):
        s.main = s.server("main")
        out["message"] = s.main.load(s.model)["message"]
        s.context = context_length(out["message"])
        s.result["measurements"].pop("load_time")
        return
    if out["model_is_gguf"]:
        for rep in range(s.cfg.load_reps):
            cache = s.workdir / f"gguf-cache-fresh-{rep}"
            env = {"MLX_BACKEND_GGUF_CACHE": str(cache)}
            fresh = s.server(f"load-fresh-{rep}", env)
            healthy.append(fresh.healthy_after)
            first.append(fresh.load(s.model))
            s.stop_server(fresh)
            last = rep == s.cfg.load_reps - 1
            again = s.server("main" if last else f"load-cached-{rep}", env)
            healthy.append(again.healthy_after)
            cached.append(again.load(s.model))
            if last:
                s.main = again
                s.gguf_cache = cache
            else:
                s.stop_server(again)
        out["first_s"] = median([r["wall_s"] for r in first])
        out["cached_s"] = median([r["wall_s"] for r in cached])
        out["first_server_s"] = median([r["server_s"] for r in first])
        out["cached_server_s"] = median([r["server_s"] for r in cached])
    else:
        s.main = s.server("main")
        healthy.append(s.main.healthy_after)
        cached.append(s.main.load(s.model))
        out["folder_s"] = cached[0]["wall_s"]
    out["samples"] = {"first": first, "cached": cached}
    out["server_start_to_healthy_s"] = median(healthy)
    message = cached[-1]["message"]
    out["load_message"] = message
    s.context = context_length(message)
