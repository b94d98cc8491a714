"""9. The prompt cache as chats use it: new conversations behind one system
prompt, and saved prompts found again after a restart.

New conversations: six chats in a row (Messages through the chat template)
with the same ~1k-token system prompt and different short user turns. The
first computes the system prompt and leaves it as a pinned checkpoint; every
later one should start from that checkpoint, so the 5th is as fast as the 2nd
(a checkpoint that is consumed, evicted or slower to find would show here).

Warm after restart: a server loaded with `prompt_cache_path:DIR` (an empty
folder) answers a chat (cold; it saves the system-prompt checkpoint to DIR),
stops; a fresh server loaded on the same folder answers the same chat (warm).
Both servers answer one unrelated raw prompt first, so neither TTFT carries the
first request's one-off costs.
"""

import json

import backend_pb2
from common import log, median, ratio
from report import fmt
from streams import predict_options, run_stream

COUNTERS = ("hits_exact", "hits_shorter", "hits_longer", "misses", "evictions", "inserts",
            "tokens_saved")
TOKENS = 4  # TTFT is what is measured; a few tokens end each chat quickly
USERS = ("What does the handbook say about rivers?",
         "What does the handbook say about bridges?",
         "What does the handbook say about lanterns?",
         "What does the handbook say about harbors?",
         "What does the handbook say about gardens?",
         "What does the handbook say about winters?")


def chat_request(system: str, user: str, **fields):
    return predict_options("", TOKENS, Messages=[
        backend_pb2.Message(role="system", content=system),
        backend_pb2.Message(role="user", content=user)], UseTokenizerTemplate=True, **fields)


def cache_stats(server) -> dict:
    text = server.metrics().prompt_json_for_slot
    return json.loads(text).get("prompt_cache", {}) if text else {}


def timed_chat(server, system, user) -> dict:
    res = run_stream(server.stub, chat_request(system, user))
    if res.error:
        raise RuntimeError(res.error)
    server.wait_idle()
    metrics = server.metrics()
    return {"ttft_s": res.ttft, "prompt_tokens": res.final.prompt_tokens,
            "server_prompt_ms": res.final.timing_prompt_processing,
            "processed": metrics.prompt_tokens_processed}


def system_tokens(s) -> int:
    return max(64, min(1000, (s.context or 2048) - 256))


def new_conversations(s, out):
    reps = s.cfg.conversation_reps
    n_sys = system_tokens(s)
    runs = []
    for rep in range(reps):
        system = s.book.cold(s.book.text_of_tokens(n_sys))
        before = cache_stats(s.main)
        chats = []
        for i, user in enumerate(USERS):
            r = timed_chat(s.main, system, user)
            chats.append(r)
            log(f"    conversation {i + 1}: TTFT {fmt(r['ttft_s'], '.3f', ' s')}, processed "
                f"{r['processed']}/{r['prompt_tokens']} tokens")
        after = cache_stats(s.main)
        runs.append({"chats": chats, "cache_stats_delta": {
            k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS if k in after}})
    by_index = [median([run["chats"][i]["ttft_s"] for run in runs]) for i in range(len(USERS))]
    out.update({
        "system_tokens": n_sys, "conversations": len(USERS), "reps": reps,
        "ttft_s_by_index": by_index,
        "ttft_2nd_s": by_index[1], "ttft_5th_s": by_index[4],
        "processed_2nd": median([run["chats"][1]["processed"] for run in runs]),
        "processed_5th": median([run["chats"][4]["processed"] for run in runs]),
        "prompt_tokens_2nd": median([run["chats"][1]["prompt_tokens"] for run in runs]),
        "runs": runs,
    })
    out["ratio_5th_2nd"] = ratio(out["ttft_5th_s"], out["ttft_2nd_s"])
    out["pass_conversations"] = out["ratio_5th_2nd"] is not None and out["ratio_5th_2nd"] <= 1.2
    hits = [run["cache_stats_delta"].get("hits_shorter") for run in runs]
    if any(h is not None and h < len(USERS) - 1 for h in hits):
        out["warning"] = (f"new conversations 2..{len(USERS)} were not all served from the "
                          f"system-prompt checkpoint (hits_shorter per run: {hits})")


def restart(s, out):
    """Cold on a server with an empty prompt_cache_path folder, warm on a fresh
    server loaded on the same folder."""
    reps = s.cfg.restart_reps
    n_sys = system_tokens(s)
    folder = s.workdir / "saved-prompts"
    options = [f"prompt_cache_path:{folder}"]
    systems = [s.book.cold(s.book.text_of_tokens(n_sys)) for _ in range(reps)]
    users = [USERS[rep % len(USERS)] for rep in range(reps)]
    warmup = s.book.plain(-2)  # raw prompt: no template, no checkpoint, nothing saved
    res = {"options": options, "reps": reps}
    for phase in ("cold", "warm"):
        server = s.server(f"restart-{phase}")
        try:
            res[f"{phase}_load_s"] = server.load(s.model, options)["wall_s"]
            before = cache_stats(server)
            run_stream(server.stub, predict_options(warmup, 8))  # not measured
            server.wait_idle()
            chats = []
            for system, user in zip(systems, users):
                r = timed_chat(server, system, user)
                chats.append(r)
                log(f"    {phase} (server {server.name}): TTFT {fmt(r['ttft_s'], '.3f', ' s')}, "
                    f"processed {r['processed']}/{r['prompt_tokens']} tokens")
            res[phase] = chats
            res[f"{phase}_cache_stats_at_load"] = before
            res[f"{phase}_cache_stats"] = cache_stats(server)
        finally:
            s.stop_server(server)
        if phase == "cold":
            res["files_saved"] = len(list(folder.glob("*.safetensors")))
    res.update({
        "system_tokens": n_sys,
        "cold_ttft_s": median([r["ttft_s"] for r in res["cold"]]),
        "warm_ttft_s": median([r["ttft_s"] for r in res["warm"]]),
        "cold_processed": median([r["processed"] for r in res["cold"]]),
        "warm_processed": median([r["processed"] for r in res["warm"]]),
        "prompt_tokens": median([r["prompt_tokens"] for r in res["cold"]]),
        "cold_server_prompt_ms": median([r["server_prompt_ms"] for r in res["cold"]]),
        "warm_server_prompt_ms": median([r["server_prompt_ms"] for r in res["warm"]]),
    })
    res["ratio"] = ratio(res["warm_ttft_s"], res["cold_ttft_s"])
    res["ratio_server"] = ratio(res["warm_server_prompt_ms"], res["cold_server_prompt_ms"])
    res["pass"] = res["ratio"] is not None and res["ratio"] <= 0.2
    out["restart"] = res


def run(s):
    out = s.m("conversations")
    new_conversations(s, out)
    restart(s, out)
    out["pass"] = bool(out.get("pass_conversations")) and bool(out["restart"].get("pass"))
