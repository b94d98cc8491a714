"""The report: a header about the machine and model, the table of measurements
against their targets, errors and warnings, and the JSON of the whole run."""

import json
from pathlib import Path

TARGETS = {
    "overhead": "server/raw >= 0.90",
    "scaling": "16-stream >= 5x 1-stream",
    "ttft_load": "<= 3x idle",
    "health_p95": "p95 < 50 ms",
    "cache_ratio": "warm/cold <= 0.2",
    "cache_bound": "bytes <= budget",
    "cache_unit": "< 2 ms; 2k-token lookups flat from 1k to 32k stored (32k/1k <= 2)",
    "new_conversations": "5th/2nd <= 1.2",
    "cache_restart": "warm/cold <= 0.2",
    "kv_bytes_8": "8-bit <= 0.55x full",
    "kv_bytes_4": "4-bit <= 0.35x full",
    "kv_speed": "as measured (no target)",
    "spec_batch": "on/off >= 0.95",
}


def fmt(value, spec=".1f", unit=""):
    if value is None:
        return "n/a"
    return f"{value:{spec}}{unit}"


def ms(seconds):
    return None if seconds is None else seconds * 1000


def fmt_ms(seconds):
    return fmt(ms(seconds), ".0f", " ms")


def mb(n):
    return None if n is None else n / 2**20


def fmt_load(values):
    return "n/a" if not values else "/".join(f"{x:.1f}" for x in values)


def verdict(ok):
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def table(result) -> str:
    M = result["measurements"]
    errors = result.get("errors", {})
    rows = []

    def row(num, name, measured, target="", ok=None):
        rows.append((num, name, measured, target, "" if ok == "" else verdict(ok)))

    def err(key, num, name):
        if key not in M and key not in errors:
            return True  # phase not run (--only)
        if key in errors:
            row(num, name, "ERROR: " + errors[key][:60], "", "")
            return True
        return False

    o = M.get("overhead", {})
    if not err("overhead", "1", "server overhead"):
        row("1", "decode tok/s, 1 stream via gRPC PredictStream", fmt(o.get("server_tps")), "", "")
        row("", "decode tok/s, raw mlx_lm.stream_generate", fmt(o.get("raw_tps")), "", "")
        row("", "server / raw", fmt(o.get("ratio"), ".2f"), TARGETS["overhead"], o.get("pass"))
        row("", "  median of back-to-back pairs' server/raw",
            fmt(o.get("ratio_paired_median"), ".2f"), "", "")
    c = M.get("concurrency", {})
    if not err("concurrency", "2", "concurrency"):
        for n, lv in c.get("levels", {}).items():
            row("2" if n == "1" else "", f"aggregate decode tok/s, {n} stream{'s' * (n != '1')}",
                fmt(lv["aggregate_tps"]), "", "")
        top = c.get("levels", {}).get("16", {})
        if top.get("ttft_p50_s") is not None:
            row("", "  16 new requests at once: per-stream decode tok/s, TTFT p50",
                f"{fmt(top.get('per_stream_tps'))}, {fmt_ms(top['ttft_p50_s'])}",
                "", "")
        row("", "16 streams / 1 stream", fmt(c.get("ratio_16_to_1"), ".2f", "x"),
            TARGETS["scaling"], c.get("pass"))
        if c.get("raw_batch_top_tps") is not None:
            row("", "  context: same 16 prompts, raw mlx-lm BatchGenerator",
                fmt(c["raw_batch_top_tps"]), "", "")
            row("", "  context: server / raw BatchGenerator at 16",
                fmt(c.get("server_vs_raw_batch_top"), ".2f"), "", "")
    t = M.get("ttft_load", {})
    if not err("ttft_load", "3", "TTFT under load"):
        row("3", f"TTFT idle, cold {t.get('probe_prompt_tokens')}-token prompt",
            fmt_ms(t.get("idle_ttft_s")), "", "")
        row("", "TTFT of the same while 8 streams decode",
            fmt_ms(t.get("loaded_ttft_s")), "", "")
        row("", "under load / idle", fmt(t.get("ratio"), ".2f", "x"), TARGETS["ttft_load"],
            t.get("pass"))
        row("", "  all probes cold (GetMetrics processed = prompt)",
            {True: "yes", False: "NO", None: "n/a"}[t.get("all_cold")], "", "")
    h = M.get("health", {})
    if "concurrency" not in errors and h:
        row("4", "Health p50 / p95 while 16 streams decode",
            f"{fmt(h.get('health_p50_ms'))} / {fmt(h.get('health_p95_ms'))} ms",
            TARGETS["health_p95"], h.get("pass"))
        row("", "  Health p99 / max, samples",
            f"{fmt(h.get('health_p99_ms'))} / {fmt(h.get('health_max_ms'))} ms, "
            f"{h.get('health_samples')}", "", "")
    p = M.get("prompt_cache", {})
    if not err("prompt_cache", "5", "prompt cache"):
        row("5", f"TTFT cold, {fmt(p.get('prefix_tokens'), '.0f')}-token prefix + suffix",
            fmt_ms(p.get("cold_ttft_s")), "", "")
        row("", "TTFT warm (prefix cached)",
            fmt_ms(p.get("warm_ttft_s")), "", "")
        row("", "warm / cold (client TTFT)", fmt(p.get("ratio"), ".3f"), TARGETS["cache_ratio"],
            p.get("pass"))
        row("", "warm / cold (server timing_prompt_processing)",
            f"{fmt(p.get('ratio_server'), '.3f')} ({fmt(p.get('warm_server_prompt_ms'), '.0f')}"
            f" / {fmt(p.get('cold_server_prompt_ms'), '.0f')} ms)", "", "")
        row("", "prompt tokens processed cold / warm",
            f"{fmt(p.get('cold_processed'), '.0f')} / {fmt(p.get('warm_processed'), '.0f')}"
            f" of {fmt(p.get('prompt_tokens'), '.0f')}", "", "")
    b = M.get("cache_bound", {})
    if not err("cache_bound", "6", "prompt cache bound"):
        cps = ", ".join(f"{cp['requests']}: {cp['bytes'] / 2**20:.2f} MiB/{cp['entries']}"
                        for cp in b.get("checkpoints", []))
        row("6", "cache MiB/entries after N requests", cps or "n/a", "", "")
        row("", "peak cache bytes (Status polled 40/s) / budget",
            f"{fmt(mb(b.get('peak_bytes')), '.2f')} / {fmt(mb(b.get('budget_bytes')), '.2f')} "
            f"MiB, {b.get('peak_entries')} entries", TARGETS["cache_bound"], b.get("pass"))
    lt = M.get("load_time", {})
    if not err("load_time", "7", "load time"):
        if lt.get("model_is_gguf"):
            row("7", "LoadModel, first (GGUF import, fresh cache dir)",
                fmt(lt.get("first_s"), ".2f", " s"), "", "")
            row("", "LoadModel, cached (new server, same cache dir)",
                fmt(lt.get("cached_s"), ".2f", " s"), "", "")
        else:
            row("7", "LoadModel (model folder; no GGUF import)",
                fmt(lt.get("folder_s"), ".2f", " s"), "", "")
    u = M.get("cache_unit", {})
    if not err("cache_unit", "8", "prompt cache container"):
        rows.extend(cache_unit_rows(u))
    cv = M.get("conversations", {})
    if not err("conversations", "9", "new conversations / restart"):
        rows.extend(conversation_rows(cv))
    kv = M.get("kv_quant", {})
    if not err("kv_quant", "10", "quantized KV cache"):
        rows.extend(kv_quant_rows(kv))
    sp = M.get("speculative", {})
    if not err("speculative", "11", "speculative decoding"):
        rows.extend(speculative_rows(sp))
    if not err("distributed", "12", "distributed (2 ranks)"):
        rows.extend(distributed_rows(M["distributed"]))
    if not err("cpu_speed", "14", "CPU speed vs llama.cpp"):
        import cpu_speed
        rows.extend(cpu_speed.rows(M["cpu_speed"]))
    return render(rows)


def render(rows) -> str:
    """Rows of (#, measurement, measured, target, verdict) as an aligned table."""
    header = ("#", "measurement", "measured", "target", "")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(5)]
    lines = []
    for r in [header] + rows:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
        if r is header:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


UNIT_LABELS = {
    "miss": "2k-token miss (shares 1 token with all)",
    "miss3": "2k-token, 3-token share (served as longer)",
    "longer": "2k-token longer hit (diverges inside an entry)",
    "shorter": "shorter hit (entry + 50 tokens: O(request))",
    "insert": "insert (new entry of N tokens: O(request))",
}


def cache_unit_rows(u) -> list:
    """Rows of the container's unit bench (cache_unit.py): ms per op at each N."""
    rows = []
    sizes = [str(n) for n in u.get("sizes", [])]
    names = "/".join(f"{int(n) // 1024}k" for n in sizes)
    first = True
    for op, label in UNIT_LABELS.items():
        per = u.get("ops", {}).get(op)
        if not per:
            continue
        values = "/".join(fmt(per[n]["median_ms"], ".3f") for n in sizes)
        rows.append(("8" if first else "",
                     f"container, 64 entries: {label}, ms at {names}" if first
                     else f"  {label}",
                     f"{values} (32k/1k {fmt(per.get('ratio_32k_1k'), '.1f', 'x')})",
                     TARGETS["cache_unit"] if first else "", verdict(per.get("pass"))))
        first = False
    conv = u.get("conversion_ms")
    if conv:
        rows.append(("", "  context: request list -> int64 array alone",
                     "/".join(fmt(conv.get(n), ".3f") for n in sizes)
                     + f" ms (32k/1k {fmt(conv.get('ratio_32k_1k'), '.1f', 'x')})", "", ""))
    mem = u.get("memory")
    if mem:
        rows.append(("", f"  memory at N={mem['n'] // 1024}k, {mem['entries']} entries: "
                         "traced / reported bytes per token",
                     f"{fmt(mem['traced_bytes_per_token'], '.2f')} / "
                     f"{fmt(mem['reported_bytes_per_token'], '.2f')} "
                     f"(traced/reported {fmt(mem.get('traced_over_reported'), '.3f')})",
                     "", ""))
        rows.append(("", "  memory: traced bytes per entry beyond 8 per token / counted",
                     f"{fmt(mem['traced_bytes_per_entry_beyond_8_per_token'], '.0f')} / "
                     f"{mem['entry_overhead_bytes']} (ENTRY_OVERHEAD_BYTES)", "", ""))
    return rows


def conversation_rows(c) -> list:
    """Rows of the new-conversations and warm-after-restart bench (conversations.py)."""
    rows = []
    n = c.get("conversations", 6)
    rows.append(("9", f"TTFT of new conversations 1..{n} (~{fmt(c.get('system_tokens'), '.0f')}"
                      "-token system prompt)",
                 " / ".join(fmt(t and t * 1000, ".0f") for t in c.get("ttft_s_by_index", []))
                 + " ms", "", ""))
    rows.append(("", "TTFT 5th / 2nd new conversation",
                 f"{fmt(c.get('ratio_5th_2nd'), '.2f')} ({fmt(ms(c.get('ttft_5th_s')), '.0f')}"
                 f" / {fmt(ms(c.get('ttft_2nd_s')), '.0f')} ms)",
                 TARGETS["new_conversations"], c.get("pass_conversations")))
    rows.append(("", "  prompt tokens processed, 2nd / 5th (of prompt)",
                 f"{fmt(c.get('processed_2nd'), '.0f')} / {fmt(c.get('processed_5th'), '.0f')}"
                 f" of {fmt(c.get('prompt_tokens_2nd'), '.0f')}", "", ""))
    r = c.get("restart", {})
    if r:
        rows.append(("", "TTFT cold (fresh prompt_cache_path folder)",
                     fmt(ms(r.get("cold_ttft_s")), ".0f", " ms"), "", ""))
        rows.append(("", "TTFT warm (new server, same folder)",
                     fmt(ms(r.get("warm_ttft_s")), ".0f", " ms"), "", ""))
        rows.append(("", "warm / cold after restart", fmt(r.get("ratio"), ".3f"),
                     TARGETS["cache_restart"], r.get("pass")))
        rows.append(("", "  prompt tokens processed cold / warm, files saved",
                     f"{fmt(r.get('cold_processed'), '.0f')} / {fmt(r.get('warm_processed'), '.0f')}"
                     f" of {fmt(r.get('prompt_tokens'), '.0f')}, {r.get('files_saved')} files",
                     "", ""))
    return [(a, b, m, t, ok if ok == "" else verdict(ok)) for a, b, m, t, ok in rows]


KV_NAMES = {"kv8": "8-bit", "kv4": "4-bit"}


def kv_quant_rows(k) -> list:
    """Rows of the quantized KV cache bench (kv_quant.py)."""
    rows = []
    mem = k.get("memory", {})
    if mem:
        rows.append(("10", f"KV bytes/token (Status kv_cache), ~{mem.get('context_tokens')}"
                           "-token context: full / 8-bit / 4-bit",
                     " / ".join(fmt(mem.get(n, {}).get("kv_bytes_per_token"), ".0f")
                                for n in ("full", "kv8", "kv4")), "", ""))
        for name, label in KV_NAMES.items():
            q = mem.get(name, {})
            rows.append(("", f"  {label} / full KV bytes per token",
                         f"{fmt(q.get('ratio'), '.3f')}x", TARGETS[f"kv_bytes_{name[2]}"],
                         q.get("pass")))
        rows.append(("", "  MLX active - weights, bytes/token: full / 8-bit / 4-bit",
                     " / ".join(fmt(mem.get(n, {}).get("active_minus_weights_per_token"),
                                    ".0f") for n in ("full", "kv8", "kv4"))
                     + f" ({fmt(mem.get('kv8', {}).get('ratio_active'), '.2f')}x / "
                       f"{fmt(mem.get('kv4', {}).get('ratio_active'), '.2f')}x)", "", ""))
        rows.append(("", "  context: TTFT s / decode tok/s there, full / 8-bit / 4-bit",
                     " / ".join(fmt(mem.get(n, {}).get("ttft_s")) for n in
                                ("full", "kv8", "kv4")) + " s; "
                     + " / ".join(fmt(mem.get(n, {}).get("decode_tps")) for n in
                                  ("full", "kv8", "kv4")) + " tok/s", "", ""))
    agree = k.get("agreement", {})
    if agree:
        for name, label in KV_NAMES.items():
            a = agree.get(name, {})
            rows.append(("" if rows else "10",
                         f"greedy agreement with full KV, {label}, {agree.get('tokens')} tokens",
                         f"{a.get('agree_fully')}/{agree.get('prompts')} prompts fully, mean "
                         f"common prefix {fmt(a.get('mean_common_prefix'), '.1f')}", "", ""))
    speed = k.get("speed", {})
    for n in ("1", "8"):
        lv = speed.get(n)
        if lv:
            rows.append(("", f"decode tok/s, {n} stream{'s' * (n != '1')}: full / 8-bit KV",
                         f"{fmt(lv.get('full'))} / {fmt(lv.get('kv8'))} "
                         f"({fmt(lv.get('ratio'), '.2f')}x)", TARGETS["kv_speed"], ""))
    return [(a, b, m, t, ok if ok == "" else verdict(ok)) for a, b, m, t, ok in rows]


SPEC_LABELS = {"n2": "NDraft 2", "n3": "NDraft 3 (default)", "n4": "NDraft 4"}


def speculative_rows(p) -> list:
    """Rows of the speculative decoding bench (speculative.py)."""
    rows = []
    single = p.get("single", {})
    if single:
        rows.append(("11", "decode tok/s, 1 stream, draft = the model itself: drafts off",
                     fmt(single.get("off", {}).get("decode_tps")), "", ""))
        for name, label in SPEC_LABELS.items():
            v = single.get(name, {})
            rows.append(("", f"  {label}: tok/s (on/off), acceptance",
                         f"{fmt(v.get('decode_tps'))} ({fmt(v.get('ratio'), '.2f')}x), "
                         f"{fmt(v.get('acceptance') and v['acceptance'] * 100, '.0f', '%')} "
                         f"({v.get('accepted')}/{v.get('drafted')})", "", ""))
    look = p.get("lookup", {})
    if look:
        rows.append(("", "prompt lookup (n-gram, no draft model), repeat-a-passage prompt: "
                         "tok/s off / on, acceptance",
                     f"{fmt(look.get('off_tps'))} / {fmt(look.get('on_tps'))} "
                     f"({fmt(look.get('ratio'), '.2f')}x), "
                     f"{fmt(look.get('acceptance') and look['acceptance'] * 100, '.0f', '%')} "
                     f"({look.get('accepted')}/{look.get('drafted')})", "", ""))
    rows.append(("", "a smaller real draft model"
                 + (" (SmolLM2-135M is its family's smallest)" if p.get("default_model") else ""),
                 "none at hand: not measured", "", ""))
    batch = p.get("batch", {})
    if batch:
        rows.append(("", f"aggregate decode tok/s, {batch.get('streams')} streams: DraftModel "
                         "off / on",
                     f"{fmt(batch.get('off_tps'))} / {fmt(batch.get('on_tps'))} "
                     f"({fmt(batch.get('ratio'), '.2f')}x; {batch.get('on_drafted')} drafted)",
                     TARGETS["spec_batch"], batch.get("pass")))
        rows.append(("", "  median of back-to-back pairs' on/off",
                     fmt(batch.get("ratio_paired_median"), ".2f"), "", ""))
    return [(a, b, m, t, ok if ok == "" else verdict(ok)) for a, b, m, t, ok in rows]


def distributed_rows(d) -> list:
    """Rows of the distributed bench (distributed.py)."""
    result = []
    for n, level in d.get("levels", {}).items():
        result.append(("12" if n == "1" else "", f"aggregate decode tok/s, {n} stream(s): "
                       f"1 process / {d.get('ranks')} ranks ({d.get('parallel')}, loopback)",
                       f"{fmt(level['one_process_tps'])} / {fmt(level['two_ranks_tps'])} "
                       f"({fmt(level['ratio'], '.2f')}x)", "", ""))
        result.append(("", f"  per decode step at {n}: tick bytes, tick ms (incl. waiting); model "
                       "collective bytes",
                       f"{fmt(level['tick_bytes'], '.0f')} B, {fmt(level['tick_ms'], '.2f')} ms; "
                       f"{fmt(level['model_bytes'], '.0f')} B", "", ""))
    return result


def header(result) -> str:
    mach = result["machine"]
    server = result.get("server", {})
    raw = result.get("raw", {})
    v = mach["versions"]
    lines = [
        f"MLX backend benchmark {result['timestamp']}"
        f" ({'quick' if result['config']['quick'] else 'full'} run, "
        f"{result.get('wall_s', 0):.0f} s)",
        f"model:   {result['model_label']} ({server.get('weight_format', '?')})",
        f"device:  {server.get('device', '?')}; BLAS (server log): {server.get('blas', 'n/a')}; "
        f"raw baseline BLAS: {raw.get('blas', 'n/a')}",
        f"machine: {mach['cpu_model']}, {mach['cpu_cores']} cores "
        f"({mach['cpu_cores_usable']} usable), "
        f"{fmt(mach['memory_bytes'] and mach['memory_bytes'] / 2**30, '.0f', ' GiB')}"
        + (f", GPU {mach['nvidia_gpu']}" if mach.get("nvidia_gpu") else ""),
        f"versions: mlx {v.get('mlx')}, mlx-lm {v.get('mlx-lm')}, grpcio {v.get('grpcio')}; "
        f"load average at start {fmt_load(result.get('load_average_start'))}, "
        f"end {fmt_load(result.get('load_average_end'))}",
    ]
    return "\n".join(lines)


def text(result) -> str:
    """Header, table, then errors and warnings: what run.py prints."""
    out = header(result) + "\n\n" + result["table"]
    profile = result["measurements"].get("step_profile")
    if profile and profile.get("decode") is not None:
        import step_profile
        out += "\n\n13. where the time goes (model called directly, no server)\n"
        out += step_profile.table(profile)
    if result["errors"]:
        out += "\n\nerrors:\n" + "\n".join(f"  {k}: {v}" for k, v in result["errors"].items())
    warnings = [f"  {k}: {v['warning']}" for k, v in result["measurements"].items()
                if isinstance(v, dict) and v.get("warning")]
    aborted = [name for name, e in result.get("server_exits", {}).items() if e["aborted"]]
    if aborted:
        warnings.append(f"  servers that did not exit cleanly on SIGTERM: {', '.join(aborted)} "
                        "(see their logs)")
    if warnings:
        out += "\n\nwarnings:\n" + "\n".join(warnings)
    return out


def write_json(result, folder: Path, stamp: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stamp}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path
