#!/usr/bin/env python3
"""8. The prompt-cache container on its own: no server, no model.

    .venv/bin/python bench/cache_unit.py           # a few seconds
    .venv/bin/python bench/cache_unit.py --quick   # fewer repeats
    .venv/bin/python bench/cache_unit.py --json    # and the JSON of the numbers

ThreadSafeLRUPromptCache as the engine builds it (a slice hook, min_longer_keep
2, bookkeeping counted), holding 64 entries of N tokens (N = 1k, 8k, 32k;
random ids < 50k). Every entry starts with the same 3-token header (a chat
template's opening); half of them then continue with one shared system prompt
(1k tokens; N/2 at N = 1k, so entries stay distinct). Payloads are plain
objects: nbytes 0, slicing O(1), so the time is the container's own.

Timed per operation (median of repeats, ms):
  miss     a request of 2k tokens sharing 1 token with every entry (a true miss:
           with min_longer_keep 2, a shared 3-token header is served as a
           3-token "longer" copy, so that case, miss3, is timed apart);
  miss3    a request of 2k tokens sharing the 3-token header with every entry;
  longer   a 2k-token request diverging inside a stored entry (a prefix copy);
  shorter  a stored entry + 50 new tokens (its owner takes it; put back untimed);
  insert   a new entry of N tokens (taken out again untimed).
miss, miss3 and longer keep the request's length fixed, so they show how the
cost follows the stored length (target: flat). shorter and insert necessarily
read a request as long as the entry: their cost is O(request length).
Context: converting the request list to an int64 array alone, the floor of
any lookup that reads the request.

Memory: tracemalloc growth of building the container with 64 entries of 8k
tokens (token lists and payloads made beforehand, so only the container's
own arrays, entries and tables count), per token, next to what the container
reports (`nbytes`, bookkeeping counted) per token.
"""

import argparse
import gc
import json
import sys
import time
import tracemalloc

import numpy as np

from mlx_backend.prompt_cache import ENTRY_OVERHEAD_BYTES, ThreadSafeLRUPromptCache

SIZES = (1024, 8192, 32768)
ENTRIES = 64
VOCAB = 50_000
HEADER = 3  # tokens every entry starts with
SYSTEM = 1024  # the shared system prompt of half the entries (N/2 when N <= 1k)
NEW_TURN = 50
WARMUP = 5  # untimed operations before each timed series
MEMORY_N = 8192
MODEL = "bench-model"
TARGET_MS = 2.0
TARGET_FLAT = 2.0  # 32k/1k at most this: "flat"
REQUEST = 2048  # tokens of the fixed-length requests
FLAT_OPS = ("miss", "miss3", "longer")  # request length fixed: cost must not follow N

# The request kinds and the stats counter each should move. A shared first
# token makes the container compare the whole of every entry (the worst case);
# "miss3" is counted as hits_longer (3 tokens kept), not as a miss.
OPS = ("miss", "miss3", "shorter", "longer", "insert")
EXPECT = {"miss": "misses", "miss3": "hits_longer", "shorter": "hits_shorter",
          "longer": "hits_longer", "insert": "inserts"}


class Payload:
    """A stand-in KV cache: how many positions it holds. Slicing is O(1)."""

    __slots__ = ("length",)

    def __init__(self, length):
        self.length = length


def can_trim(p):
    return True


def trim(p, n):
    p.length -= n


def slice_prefix(p, keep):
    return Payload(keep)


def make_cache():
    """The engine's construction (mlx_backend/engine.py _load), with nbytes 0."""
    return ThreadSafeLRUPromptCache(
        max_size=10_000, can_trim_fn=can_trim, trim_fn=trim, slice_fn=slice_prefix,
        max_bytes=2**62, nbytes_fn=lambda p: 0, min_longer_keep=2, count_keys=True)


class Workload:
    """64 stored sequences of n tokens, and fresh tokens to build requests from."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.rng = np.random.default_rng(seed)
        self.header = self.fresh(HEADER)
        system = self.fresh(min(SYSTEM, n // 2) - HEADER)
        self.stored = []
        for i in range(ENTRIES):
            head = self.header + (system if i % 2 == 0 else [])
            self.stored.append(head + self.fresh(n - len(head)))

    def fresh(self, k: int):
        """k random ids; the first never equals the header's first token, so a
        request built on it diverges right there."""
        out = self.rng.integers(0, VOCAB, size=k).tolist()
        if out and hasattr(self, "header") and self.header and out[0] == self.header[0]:
            out[0] = (out[0] + 1) % VOCAB
        return out

    def request(self, op: str, i: int):
        n, entry = self.n, self.stored[i % ENTRIES]
        if op == "miss":
            return self.header[:1] + self.fresh(REQUEST - 1)
        if op == "miss3":
            return self.header + self.fresh(REQUEST - HEADER)
        if op == "shorter":
            return entry + self.fresh(NEW_TURN)
        if op == "longer":
            keep = min(n // 2, REQUEST // 2)
            return entry[:keep] + self.fresh(REQUEST - keep)
        if op == "insert":
            return self.header + self.fresh(n - HEADER)
        raise ValueError(op)


def fill(cache, work):
    for tokens in work.stored:
        cache.insert_cache(MODEL, tokens, Payload(len(tokens)))


def time_op(cache, work, op: str, reps: int):
    """Median and p90 ms of `reps` operations; requests are built before each
    timed call, the container is restored after it (both untimed)."""
    times = []
    kinds = {}
    for i in range(-WARMUP, reps):  # the first WARMUP are not counted
        tokens = work.request(op, i)
        before = cache.stats()
        gc.collect(0)
        if op == "insert":
            t0 = time.perf_counter()
            cache.insert_cache(MODEL, tokens, Payload(len(tokens)))
            times.append(time.perf_counter() - t0)
        else:
            t0 = time.perf_counter()
            got, rest = cache.fetch_nearest_cache(MODEL, tokens)
            times.append(time.perf_counter() - t0)
        after = cache.stats()  # what the timed call was counted as
        for key in set(EXPECT.values()):
            if after[key] > before[key] and i >= 0:
                kinds[key] = kinds.get(key, 0) + 1
        if op == "insert":  # take it out again
            got, _ = cache.fetch_nearest_cache(MODEL, tokens)
            assert got is not None
        elif op == "shorter":  # the owner took it; put it back for the next rep
            cache.insert_cache(MODEL, work.stored[i % ENTRIES], got)
        assert len(cache) == ENTRIES, (op, len(cache))
    ms = sorted(t * 1000 for t in times[WARMUP:])
    if kinds != {EXPECT[op]: reps}:
        raise RuntimeError(f"{op} at N={work.n}: counted as {kinds}, expected "
                           f"{EXPECT[op]} every time")
    return {"median_ms": ms[len(ms) // 2], "p90_ms": ms[int(len(ms) * 0.9)],
            "min_ms": ms[0], "reps": reps, "counted_as": kinds}


def time_conversion(work, reps: int):
    """The request list -> int64 array alone: what any lookup must pay."""
    times = []
    for i in range(reps):
        tokens = work.request("shorter", i)
        t0 = time.perf_counter()
        np.asarray(tokens, dtype=np.int64)
        times.append(time.perf_counter() - t0)
    ms = sorted(t * 1000 for t in times)
    return ms[len(ms) // 2]


def measure_memory(n: int = MEMORY_N):
    """tracemalloc growth of a container holding 64 entries of n tokens."""
    work = Workload(n, seed=7)
    payloads = [Payload(len(t)) for t in work.stored]
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        cache = make_cache()
        for tokens, payload in zip(work.stored, payloads):
            cache.insert_cache(MODEL, tokens, payload)
        gc.collect()
        held, peak = tracemalloc.get_traced_memory()
        held -= base
        peak -= base
    finally:
        tracemalloc.stop()
    tokens = ENTRIES * n
    return {"n": n, "entries": ENTRIES, "tokens": tokens,
            "traced_bytes": held, "traced_peak_bytes": peak,
            "traced_bytes_per_token": held / tokens,
            "traced_bytes_per_entry_beyond_8_per_token": (held - 8 * tokens) / ENTRIES,
            "reported_bytes": cache.nbytes,
            "reported_bytes_per_token": cache.nbytes / tokens,
            "entry_overhead_bytes": ENTRY_OVERHEAD_BYTES,
            "traced_over_reported": held / cache.nbytes if cache.nbytes else None}


def measure(quick: bool = False, log=None) -> dict:
    out = {"entries": ENTRIES, "sizes": list(SIZES), "vocab": VOCAB, "header_tokens": HEADER,
           "system_tokens": {str(n): min(SYSTEM, n // 2) for n in SIZES},
           "new_turn_tokens": NEW_TURN, "target_ms": TARGET_MS, "target_flat": TARGET_FLAT,
           "ops": {op: {} for op in OPS}, "conversion_ms": {}}
    for n in SIZES:
        reps = (40 if quick else 200) if n <= 8192 else (20 if quick else 100)
        work = Workload(n, seed=n)
        cache = make_cache()
        fill(cache, work)
        assert len(cache) == ENTRIES
        for op in OPS:
            res = time_op(cache, work, op, reps)
            out["ops"][op][str(n)] = res
            if log:
                log(f"    N={n:>5} {op:<7} median {res['median_ms']:.3f} ms, "
                    f"p90 {res['p90_ms']:.3f} ms ({reps} ops; counted as {res['counted_as']})")
        out["conversion_ms"][str(n)] = time_conversion(work, reps)
        del cache, work
        gc.collect()
    lo, hi = str(SIZES[0]), str(SIZES[-1])
    ok = True
    for op in OPS:
        per = out["ops"][op]
        per["ratio_32k_1k"] = per[hi]["median_ms"] / per[lo]["median_ms"]
        per["max_ms"] = max(per[str(n)]["median_ms"] for n in SIZES)
        per["pass"] = per["max_ms"] < TARGET_MS and (
            op not in FLAT_OPS or per["ratio_32k_1k"] <= TARGET_FLAT)
        ok = ok and per["pass"]
    conv = out["conversion_ms"]
    conv["ratio_32k_1k"] = conv[hi] / conv[lo] if conv[lo] else None
    out["pass"] = ok
    out["memory"] = measure_memory()
    if log:
        mem = out["memory"]
        log(f"    memory at N={mem['n']}: traced {mem['traced_bytes_per_token']:.2f} B/token, "
            f"reported {mem['reported_bytes_per_token']:.2f} B/token")
    return out


def run(s):
    """The bench phase: results under measurements.cache_unit."""
    from common import log
    s.m("cache_unit").update(measure(s.cfg.quick, log))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--json", action="store_true", help="print the JSON too")
    args = parser.parse_args(argv)
    import report
    from common import log
    result = measure(args.quick, log)
    print(report.render(report.cache_unit_rows(result)))
    if args.json:
        print(json.dumps(result, indent=2))
    return 0  # like run.py: a missed target is a verdict in the table, not an error


if __name__ == "__main__":
    sys.exit(main())
