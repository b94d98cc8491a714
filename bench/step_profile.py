#!/usr/bin/env python3
"""Where one decode step's time goes, at batch 1 and 16, and where a 1k-token
prefill's time goes, for the default model on the CPU.

    .venv/bin/python bench/step_profile.py --quick          # ~2-3 min: the table
    .venv/bin/python bench/step_profile.py                  # more repeats
    .venv/bin/python bench/step_profile.py --json out.json  # also write the numbers

Run it with run.sh's preload (OpenBLAS and its forwarders); main()
re-executes itself with run.sh's LD_PRELOAD when it is missing
(MLX_BACKEND_NO_OPENBLAS=1 turns that off).

Method. The model is loaded the way the server loads it (load_model: the GGUF
imported to float32 MLX weights). A decode step is mlx-lm's model on one token
per row with real BatchKVCaches holding `context` (100) positions per row, then
what BatchGenerator does with the logits for greedy rows (log-softmax, batched
argmax, the per-row logprob views). Every component is timed in isolation at the
step's exact shapes with the real weights and caches: the graph for that op type
in all 30 blocks is built first and only `mx.eval` is timed (many iterations,
caches trimmed back after each so they stay at `context`). What the parts do not
explain is the Python/dispatch overhead row: the whole step minus the sum of
parts (its "graph build" line is the Python time of building the step's lazy
graph alone, which BatchGenerator overlaps with the previous step's compute).
mlx-lm's BatchGenerator is timed end to end for comparison: prompts inserted,
then `next()` calls in steady decode.

Prefill is 1024 tokens of one sequence in chunks of prefill_step_size (256, 512,
1024) through a BatchKVCache, evaluating only the cache state after each chunk as
mlx-lm's PromptProcessingBatch does (so the LM head, the final norm and the last
block's attention output and MLP are never computed); its parts are summed over
the chunks.

The whole decode step (BatchGenerator.next()) and the whole prefill are timed
again with the server's CPU fast path (cpu_blocks.py: compiled decode pieces,
attention as compiled ops, kernels built for this CPU): the after to the
parts' before.

Parts are timed alone, so their sum need not match the whole exactly (more so
for prefill, whose parts run seconds each on a shared machine): read the rows as
shares. The machine is shared, so variants are interleaved round by round and
every number is a median (the minimum is kept too).

`run(...)` returns all numbers as a dict; `run_subprocess(...)` runs it in a
child process with run.sh's environment (the bench process itself imports no MLX).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(BENCH) not in sys.path:  # run as a script from elsewhere, or imported
    sys.path.insert(0, str(BENCH))

from machine import env_like_run_sh, project_python, run_sh_preload  # noqa: E402

DECODE_ROWS = (
    ("proj", "projection GEMMs (q,k,v,o) x30"),
    ("attn", "attention proper x30 (RoPE+cache+mask+SDPA)"),
    ("attn_rope", "  of which RoPE q,k (+reshapes)"),
    ("attn_cache", "  of which KV cache update"),
    ("attn_sdpa", "  of which mask + SDPA (+out reshape)"),
    ("mlp_gemm", "MLP GEMMs (gate,up,down) x30"),
    ("mlp_elem", "MLP elementwise (silu*mul) x30"),
    ("norms", "RMSNorms x61"),
    ("embed_resid", "embedding + residual adds x60"),
    ("lm_head", "LM head GEMM (tied embedding)"),
    ("sampling", "sampling: log-softmax + argmax"),
)
SUMMED = ("proj", "attn", "mlp_gemm", "mlp_elem", "norms", "embed_resid", "lm_head", "sampling")
PREFILL_ROWS = (
    ("gemm_proj", "projection GEMMs (q,k,v,o)"),
    ("gemm_mlp", "MLP GEMMs (gate,up,down)"),
    ("attn", "attention (RoPE+cache+mask+SDPA)"),
    ("attn_sdpa", "  of which mask + SDPA"),
    ("mlp_elem", "MLP elementwise (silu*mul)"),
    ("norms", "RMSNorms"),
    ("embed_resid", "embedding + residual adds"),
)
PREFILL_SUMMED = ("gemm_proj", "gemm_mlp", "attn", "mlp_elem", "norms", "embed_resid")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _median(xs):
    return statistics.median(xs) if xs else None


def _p10(xs):
    """10th percentile: the step time with the least interference from other
    processes on a shared machine."""
    xs = sorted(xs)
    return xs[int(0.1 * (len(xs) - 1))] if xs else None


# --------------------------------------------------------------------- timing

def collect(variants, rounds, iters, warmup=1):
    """Time each `fn() -> seconds` in `variants`: `rounds` rounds, each running
    every variant `iters` times, the order rotating per round so drift on a
    shared machine hits all of them alike. Returns per-variant stats in ms."""
    names = list(variants)
    samples = {n: [] for n in names}
    per_round = {n: [] for n in names}
    for n in names:
        for _ in range(warmup):
            variants[n]()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            xs = [variants[n]() for _ in range(iters)]
            samples[n] += xs
            per_round[n].append(statistics.median(xs))
    return {n: {"ms": 1e3 * statistics.median(samples[n]), "min_ms": 1e3 * min(samples[n]),
                "n": len(samples[n]), "rounds_ms": [1e3 * x for x in per_round[n]]}
            for n in names}


def paired_ratio(stats, variant, baseline):
    """Median over rounds of baseline/variant time (>1: the variant is faster)."""
    pairs = zip(stats[baseline]["rounds_ms"], stats[variant]["rounds_ms"])
    return _median([b / v for b, v in pairs if v])


# ------------------------------------------------------------------ the model

def load(model_path=None, fast_path=False):
    """The model as the server loads it; mlx-lm's own blocks unless `fast_path`
    (the parts below are timed op by op, so the whole step must run the same
    ops: the fast path's blocks fuse some of them)."""
    from mlx_backend.default_model import default_model_path
    from mlx_backend.model_loader import load_model
    from mlx_backend.options import parse_options
    from mlx_backend.request import LoadRequest

    path = model_path or default_model_path()
    options = [] if fast_path else ["compile_decode:false"]
    return load_model(LoadRequest(model=path, options=options), parse_options(options))


def _batch_caches(model, B, context, seed=0):
    """BatchKVCaches holding `context` random-token positions per row (the way
    PromptProcessingBatch fills them: no padding, chunks of 512)."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache

    caches = [BatchKVCache([0] * B) for _ in model.layers]
    tokens = mx.random.randint(0, model.args.vocab_size, (B, context),
                               key=mx.random.key(seed))
    for s in range(0, context, 512):
        model(tokens[:, s:s + 512], cache=caches)
        mx.eval([c.state for c in caches])
    return caches


def _trim(caches, n):
    for c in caches:
        c.trim(n)


def _timed_eval(outs):
    import mlx.core as mx

    t0 = time.perf_counter()
    mx.eval(outs)
    return time.perf_counter() - t0


def _rand(shape, seed, dtype=None):
    import mlx.core as mx

    x = mx.random.normal(shape, key=mx.random.key(seed))
    return x.astype(dtype) if dtype is not None else x


def _attention(layers, caches, q_in, k_in, v_in, *, part, q_layers=None):
    """mlx-lm's Attention.__call__ after the projections, for every block, as a
    `build() -> lazy outputs` whose evaluation is what gets timed.

    part: "all" (mask, reshapes, RoPE, cache update, SDPA, output reshape),
    "rope" (reshapes + RoPE of q and k), "cache" (the cache update of roped
    k/v) or "sdpa" (mask + SDPA + output reshape on an updated cache); what a
    part needs is evaluated here, untimed. `q_layers`: the blocks whose
    attention output is used (prefill never needs the last block's)."""
    import mlx.core as mx
    from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

    B, L, _ = q_in.shape
    nq = len(layers) if q_layers is None else q_layers

    def roped():
        staged = []
        for i, (layer, cache) in enumerate(zip(layers, caches)):
            a = layer.self_attn
            keys = k_in.reshape(B, L, a.n_kv_heads, -1).transpose(0, 2, 1, 3)
            values = v_in.reshape(B, L, a.n_kv_heads, -1).transpose(0, 2, 1, 3)
            queries = None
            if i < nq:
                queries = q_in.reshape(B, L, a.n_heads, -1).transpose(0, 2, 1, 3)
                queries = a.rope(queries, offset=cache.offset)
            keys = a.rope(keys, offset=cache.offset)
            staged.append((a, cache, queries, keys, values))
        return staged

    def attend(fetched, mask):
        outs = []
        for a, cache, q, keys, values in fetched:
            if q is None:
                outs += [keys, values]
                continue
            out = scaled_dot_product_attention(q, keys, values, cache=cache, scale=a.scale,
                                               mask=mask)
            outs.append(out.transpose(0, 2, 1, 3).reshape(B, L, -1))
        return outs

    def update(staged):
        return [(a, c, q, *c.update_and_fetch(k, v)) for a, c, q, k, v in staged]

    if part == "all":
        def build():
            mask = create_attention_mask(q_in, caches[0])  # before the update, as the model
            return attend(update(roped()), mask)
        return build
    staged = roped()
    if part == "rope":
        return lambda: [t for s in staged for t in s[2:4] if t is not None]
    mx.eval([t for s in staged for t in s[2:] if t is not None])
    if part == "cache":
        return lambda: [t for f in update(staged) for t in f[3:]]
    mask = create_attention_mask(q_in, caches[0])
    fetched = update(staged)
    mx.eval([t for f in fetched for t in f[3:]])

    def build_sdpa():
        outs = attend(fetched, mask)
        return outs + ([mask] if isinstance(mask, mx.array) else [])
    return build_sdpa


# --------------------------------------------------------------------- decode

def profile_decode(model, B, context=100, rounds=5, iters=4):
    """ms per decode step, by component, at batch B with `context` cached positions."""
    import mlx.core as mx
    from mlx_lm.models.activations import swiglu

    layers = model.layers
    inner = model.model
    args = model.args
    D, F, V = args.hidden_size, args.intermediate_size, args.vocab_size
    nh, nkv = args.num_attention_heads, args.num_key_value_heads
    hd = args.head_dim or D // nh
    caches = _batch_caches(model, B, context)
    tok = mx.random.randint(0, V, (B,), key=mx.random.key(1))
    x = _rand((B, 1, D), 2)
    xf = _rand((B, 1, F), 3)
    g, u = _rand((B, 1, F), 4), _rand((B, 1, F), 5)
    q_in, k_in, v_in = _rand((B, 1, nh * hd), 6), _rand((B, 1, nkv * hd), 7), _rand((B, 1, nkv * hd), 8)
    logits = _rand((B, 1, V), 9)
    mx.eval(tok, x, xf, g, u, q_in, k_in, v_in, logits)

    def head(lg):
        lg = lg[:, -1, :]
        lp = lg - mx.logsumexp(lg, axis=-1, keepdims=True)
        return [mx.argmax(lp, axis=-1)] + list(lp)  # BatchGenerator keeps per-row logprobs

    def step():
        t0 = time.perf_counter()
        mx.eval(head(model(tok[:, None], cache=caches)))
        dt = time.perf_counter() - t0
        _trim(caches, 1)
        return dt

    def build():
        t0 = time.perf_counter()
        outs = head(model(tok[:, None], cache=caches))
        dt = time.perf_counter() - t0
        mx.eval(outs)
        _trim(caches, 1)
        return dt

    def attn(part):
        def fn():
            build_outs = _attention(layers, caches, q_in, k_in, v_in, part=part)
            dt = _timed_eval(build_outs())
            if part != "rope":
                _trim(caches, 1)
            return dt
        return fn

    def proj():
        outs = []
        for l in layers:
            a = l.self_attn
            outs += [a.q_proj(x), a.k_proj(x), a.v_proj(x), a.o_proj(x)]
        return _timed_eval(outs)

    def mlp_gemm():
        return _timed_eval([o for l in layers for o in
                            (l.mlp.gate_proj(x), l.mlp.up_proj(x), l.mlp.down_proj(xf))])

    def mlp_elem():
        return _timed_eval([swiglu(g, u) for _ in layers])

    def norms():
        return _timed_eval([n(x) for l in layers for n in (l.input_layernorm,
                                                             l.post_attention_layernorm)]
                           + [inner.norm(x)])

    def embed_resid():
        h = inner.embed_tokens(tok[:, None])
        outs = [h]
        for _ in layers:
            outs += [x + h, h + x]
        return _timed_eval(outs)

    def lm_head():
        return _timed_eval(inner.embed_tokens.as_linear(x)
                           if args.tie_word_embeddings else model.lm_head(x))

    def sampling():
        return _timed_eval(head(logits))

    variants = {"step": step, "build": build, "proj": proj, "attn": attn("all"),
                "attn_rope": attn("rope"), "attn_cache": attn("cache"),
                "attn_sdpa": attn("sdpa"), "mlp_gemm": mlp_gemm, "mlp_elem": mlp_elem,
                "norms": norms, "embed_resid": embed_resid, "lm_head": lm_head,
                "sampling": sampling}
    variants.update(_sampler_variants(model, B, logits))
    stats = collect(variants, rounds, iters)
    out = {k: v for k, v in stats.items()}
    parts = sum(stats[k]["ms"] for k in SUMMED)
    out["sum_of_parts"] = {"ms": parts}
    out["overhead"] = {"ms": stats["step"]["ms"] - parts}
    out["cached_positions"] = caches[0]._idx
    out["batch"] = B
    return out


def _sampler_variants(model, B, logits):
    """Sampling at a temperature: mlx-lm's make_sampler shared by the batch (one
    categorical), and the project's per-request samplers (one call per row,
    which is what BatchGenerator does when the rows' samplers differ)."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler

    from mlx_backend.sampling import SamplingParams, make_sampler

    shared = mlx_lm_sampler(temp=0.7)
    params = SamplingParams(temperature=0.7, top_p=1.0, top_k=0, min_p=0.0,
                            repetition_penalty=1.0, repeat_last_n=64, presence_penalty=0.0,
                            frequency_penalty=0.0, logit_bias={}, xtc_probability=0.0,
                            xtc_threshold=0.1, seed=None)
    own = [make_sampler(params, model.args.vocab_size) for _ in range(B)]

    def normalized():
        lg = logits[:, -1, :]
        return lg - mx.logsumexp(lg, axis=-1, keepdims=True)

    def temp_shared():
        lp = normalized()
        return _timed_eval([shared(lp)] + list(lp))

    def temp_per_row():
        lp = normalized()
        y = mx.concatenate([s(lp[e:e + 1]) for e, s in enumerate(own)], axis=0)
        return _timed_eval([y] + list(lp))

    return {"sampling_temp_mlx_lm": temp_shared, "sampling_temp_per_request": temp_per_row}


# ------------------------------------------------------------ BatchGenerator

def profile_batch_generator(model, B, context=100, steps=20, warmup=3, samplers=None):
    """ms per BatchGenerator.next() in steady decode with B rows of `context`
    prompt tokens, with the engine's default batch settings."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from mlx_backend.options import parse_options

    s = parse_options([])
    gen = BatchGenerator(model, completion_batch_size=max(s.max_batch_size, B),
                         prefill_batch_size=min(s.prefill_batch_size, max(s.max_batch_size, B)),
                         prefill_step_size=s.prefill_step_size, max_kv_size=s.max_kv_size,
                         stream=mx.new_stream(mx.default_device()))
    prompts = mx.random.randint(0, model.args.vocab_size, (B, context),
                                key=mx.random.key(11)).tolist()
    total = steps + warmup + 4
    gen.insert(prompts, max_tokens=[total + 16] * B, samplers=samplers)
    started = time.perf_counter()
    while True:  # prefill until every row decodes
        _, responses = gen.next()
        if len(responses) == B:
            break
        if time.perf_counter() - started > 300:
            raise RuntimeError("BatchGenerator did not reach decode")
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        _, responses = gen.next()
        dt = time.perf_counter() - t0
        if len(responses) != B:
            raise RuntimeError(f"{len(responses)} rows answered, expected {B}")
        if i >= warmup:
            times.append(dt)
    gen.close()
    return {"ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "n": len(times),
            "tok_s": B / statistics.median(times)}


# -------------------------------------------------------------------- prefill

def _prefill_ids(args, tokens):
    import mlx.core as mx

    return mx.random.randint(0, args.vocab_size, (1, tokens), key=mx.random.key(21))


def prefill_seconds(model, ids, chunk):
    """One prefill of `ids` in `chunk`-token steps, as PromptProcessingBatch
    runs it (only the cache state is evaluated)."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache

    caches = [BatchKVCache([0]) for _ in model.layers]
    t0 = time.perf_counter()
    for s in range(0, ids.shape[1], chunk):
        model(ids[:, s:s + chunk], cache=caches)
        mx.eval([c.state for c in caches])
        mx.clear_cache()
    return time.perf_counter() - t0


def profile_prefill(model, tokens=1024, chunk=512, reps=2):
    """Seconds for a `tokens`-token prefill in `chunk`-token steps, by component
    (each summed over the chunks)."""
    import mlx.core as mx
    from mlx_lm.models.activations import swiglu
    from mlx_lm.models.cache import BatchKVCache

    layers = model.layers
    inner = model.model
    args = model.args
    D, F = args.hidden_size, args.intermediate_size
    nh, nkv = args.num_attention_heads, args.num_key_value_heads
    hd = args.head_dim or D // nh
    n = len(layers)
    ids = _prefill_ids(args, tokens)
    sizes = [min(chunk, tokens - s) for s in range(0, tokens, chunk)]
    inputs = {}
    for C in set(sizes):
        inputs[C] = dict(x=_rand((1, C, D), 22), xf=_rand((1, C, F), 23), g=_rand((1, C, F), 24),
                         u=_rand((1, C, F), 25), q=_rand((1, C, nh * hd), 26),
                         k=_rand((1, C, nkv * hd), 27), v=_rand((1, C, nkv * hd), 28))
        mx.eval(inputs[C])

    def fresh():
        return [BatchKVCache([0]) for _ in layers]

    def full():
        return prefill_seconds(model, ids, chunk)

    def per_chunk(fn):
        def total():
            return sum(fn(inputs[C]) for C in sizes)
        return total

    def gemm_proj(t):
        outs = []
        for i, l in enumerate(layers):
            a = l.self_attn
            outs += [a.k_proj(t["x"]), a.v_proj(t["x"])]
            if i < n - 1:  # the last block's queries and output are never needed
                outs += [a.q_proj(t["x"]), a.o_proj(t["x"])]
        return _timed_eval(outs)

    def gemm_mlp(t):
        return _timed_eval([o for l in layers[:-1] for o in
                            (l.mlp.gate_proj(t["x"]), l.mlp.up_proj(t["x"]),
                             l.mlp.down_proj(t["xf"]))])

    def mlp_elem(t):
        return _timed_eval([swiglu(t["g"], t["u"]) for _ in layers[:-1]])

    def norms(t):
        return _timed_eval([l.input_layernorm(t["x"]) for l in layers]
                           + [l.post_attention_layernorm(t["x"]) for l in layers[:-1]])

    def embed_resid(t):
        C = t["x"].shape[1]
        h = inner.embed_tokens(ids[:, :C])
        outs = [h]
        for _ in layers[:-1]:
            outs += [t["x"] + h, h + t["x"]]
        return _timed_eval(outs)

    def attn(part):
        def fn():
            caches = fresh()
            dt = 0.0
            for C in sizes:
                t = inputs[C]
                build = _attention(layers, caches, t["q"], t["k"], t["v"], part=part,
                                   q_layers=n - 1)
                dt += _timed_eval(build())
                mx.eval([c.state for c in caches])
            return dt
        return fn

    variants = {"full": full, "gemm_proj": per_chunk(gemm_proj),
                "gemm_mlp": per_chunk(gemm_mlp), "attn": attn("all"),
                "attn_sdpa": attn("sdpa"), "mlp_elem": per_chunk(mlp_elem),
                "norms": per_chunk(norms), "embed_resid": per_chunk(embed_resid)}
    stats = collect(variants, reps, 1, warmup=0)
    parts = sum(stats[k]["ms"] for k in PREFILL_SUMMED)
    stats["sum_of_parts"] = {"ms": parts}
    stats["overhead"] = {"ms": stats["full"]["ms"] - parts}
    stats["tok_s"] = tokens / (stats["full"]["ms"] / 1e3)
    stats["chunk"] = chunk
    stats["tokens"] = tokens
    return stats


# ------------------------------------------------------------------------ run

def machine():
    import mlx.core as mx

    from mlx_backend.model_loader import blas_forwarding, blas_library

    info = {"cpus": os.cpu_count(), "platform": platform.platform(),
            "mlx": mx.__version__, "blas": blas_library(), "blas_forwarding": blas_forwarding(),
            "ld_preload": os.environ.get("LD_PRELOAD"),
            "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS")}
    try:
        import mlx_lm
        info["mlx_lm"] = mlx_lm.__version__
    except Exception:
        pass
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return info


def run(model_path=None, quick=False, batches=(1, 16), context=100, prefill_tokens=1024,
        chunks=(256, 512, 1024), progress=log) -> dict:
    """Profile and return every number (milliseconds unless named otherwise).

    Imports MLX in this process: bench/run.py, which keeps MLX out of its own
    process, should use run_subprocess() instead."""
    started = time.perf_counter()
    from mlx_backend import native_kernels

    native_kernels.enable()  # as the server does, before MLX builds any kernel
    if not os.environ.get("LD_PRELOAD") and platform.system() == "Linux":
        progress("warning: no LD_PRELOAD; MLX may run without the OpenBLAS fast path")
    loaded = load(model_path)
    model = loaded.model
    result = {"model": loaded.source, "weight_format": loaded.weight_format,
              "weights_mb": loaded.weights_bytes / 2**20, "quick": quick, "context": context,
              "prefill_tokens": prefill_tokens,
              "machine": machine(), "decode": {}, "batch_generator": {}, "prefill": {}}
    rounds, iters = (4, 3) if quick else (7, 5)
    for B in batches:
        progress(f"decode step, batch {B}")
        result["decode"][str(B)] = profile_decode(model, B, context, rounds, iters)
    for B in batches:
        progress(f"BatchGenerator, batch {B}")
        result["batch_generator"][str(B)] = profile_batch_generator(
            model, B, context, steps=12 if quick else 30)
    for chunk in chunks:
        progress(f"prefill {prefill_tokens} tokens, chunks of {chunk}")
        result["prefill"][str(chunk)] = profile_prefill(model, prefill_tokens, chunk,
                                                        reps=2 if quick else 3)
    # The same, end to end, with the server's CPU fast path (cpu_blocks.py).
    del model, loaded
    fast = load(model_path, fast_path=True)
    result["fast_path"] = {"weight_format": fast.weight_format, "batch_generator": {},
                           "prefill": {}}
    for B in batches:
        progress(f"BatchGenerator, batch {B}, CPU fast path")
        result["fast_path"]["batch_generator"][str(B)] = profile_batch_generator(
            fast.model, B, context, steps=12 if quick else 30)
    ids = _prefill_ids(fast.model.args, prefill_tokens)
    prefill_seconds(fast.model, ids, chunks[0] if chunks else 512)  # first use builds kernels
    for chunk in chunks:
        progress(f"prefill {prefill_tokens} tokens, chunks of {chunk}, CPU fast path")
        ms = 1e3 * statistics.median([prefill_seconds(fast.model, ids, chunk)
                                      for _ in range(2 if quick else 3)])
        result["fast_path"]["prefill"][str(chunk)] = {"ms": ms,
                                                     "tok_s": prefill_tokens / (ms / 1e3)}
    result["wall_s"] = time.perf_counter() - started
    return result


# ------------------------------------------------------------------- table

def _pct(a, b):
    return f"{100 * a / b:5.1f}%" if a is not None and b else "     "


def _decode_table(result):
    lines = []
    dec = result["decode"]
    bs = list(dec)
    lines.append("")
    head = f"{'decode step':46s}" + "".join(f"{'B=' + b + ' ms':>11s}{'%':>7s}" for b in bs)
    lines.append(head)
    lines.append("-" * len(head))

    def row(label, key, pct=True):
        cells = ""
        for b in bs:
            d = dec[b]
            v = d.get(key, {}).get("ms")
            cells += f"{v:11.2f}" if v is not None else f"{'':11s}"
            cells += f"{_pct(v, d['step']['ms']) if pct else '':>7s}"
        lines.append(f"{label:46s}{cells}")

    for key, label in DECODE_ROWS:
        row(label, key)
    row("Python/dispatch overhead (step - sum)", "overhead")
    row("  graph build alone (Python, lazy)", "build")
    lines.append("-" * len(head))
    row("sum of parts", "sum_of_parts")
    row("whole step, synchronous (model+argmax)", "step")
    cells = ""
    for b in bs:
        g = result["batch_generator"].get(b)
        cells += f"{g['ms']:11.2f}{_pct(g['ms'], dec[b]['step']['ms']):>7s}" if g else " " * 18
    lines.append(f"{'BatchGenerator.next() end to end':46s}{cells}")
    cells = "".join(f"{result['batch_generator'][b]['tok_s']:11.1f}{'':7s}"
                    for b in bs if b in result["batch_generator"])
    lines.append(f"{'  BatchGenerator tok/s (all rows)':46s}{cells}")
    fast = result.get("fast_path", {}).get("batch_generator", {})
    if fast:
        cells = "".join(f"{fast[b]['ms']:11.2f}{'':7s}" if b in fast else " " * 18 for b in bs)
        lines.append(f"{'BatchGenerator.next(), CPU fast path':46s}{cells}")
        cells = "".join(f"{fast[b]['tok_s']:11.1f}{'':7s}" if b in fast else " " * 18
                        for b in bs)
        lines.append(f"{'  tok/s, CPU fast path':46s}{cells}")
    lines.append("")
    lines.append("not in the total: sampling at temperature 0.7")
    row("  mlx-lm make_sampler (one batched call)", "sampling_temp_mlx_lm")
    row("  project per-request samplers (per row)", "sampling_temp_per_request")

    return lines


def table(result) -> str:
    lines = []
    dec = result["decode"]
    bs = list(dec)
    m = result.get("machine", {})
    lines.append(f"model {os.path.basename(result['model'])} ({result['weight_format']}, "
                 f"{result['weights_mb']:.0f} MB); blas {m.get('blas')}"
                 f"{m.get('blas_forwarding') or ''}; "
                 f"{m.get('cpus')} CPUs; context {result['context']} positions/row")
    if bs:
        lines += _decode_table(result)

    pre = result["prefill"]
    if pre:
        cs = list(pre)
        lines.append("")
        head = f"{'prefill %d tokens, ms' % result['prefill_tokens']:46s}" + "".join(
            f"{'chunk ' + c:>11s}{'%':>7s}" for c in cs)
        lines.append(head)
        lines.append("-" * len(head))

        def prow(label, key):
            cells = ""
            for c in cs:
                v = pre[c].get(key, {}).get("ms")
                cells += f"{v:11.0f}{_pct(v, pre[c]['full']['ms']):>7s}" if v is not None \
                    else " " * 18
            lines.append(f"{label:46s}{cells}")

        for key, label in PREFILL_ROWS:
            prow(label, key)
        prow("overhead / unexplained (full - sum)", "overhead")
        lines.append("-" * len(head))
        prow("sum of parts", "sum_of_parts")
        prow("whole prefill (cache state evaluated)", "full")
        lines.append(f"{'  tok/s':46s}" + "".join(f"{pre[c]['tok_s']:11.0f}{'':7s}" for c in cs))
        fast = result.get("fast_path", {}).get("prefill", {})
        if fast:
            lines.append(f"{'whole prefill, CPU fast path':46s}" + "".join(
                f"{fast[c]['ms']:11.0f}{'':7s}" if c in fast else " " * 18 for c in cs))
            lines.append(f"{'  tok/s, CPU fast path':46s}" + "".join(
                f"{fast[c]['tok_s']:11.0f}{'':7s}" if c in fast else " " * 18 for c in cs))
    lines.append("")
    lines.append(f"(medians; wall {result.get('wall_s', 0):.0f}s; load average "
                 f"{m.get('loadavg')})")
    return "\n".join(lines)


def run_subprocess(args=(), env=None, timeout=1800) -> dict:
    """run() in a child process with run.sh's environment; `args` are this
    script's command-line options (e.g. ["--quick"])."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile.json"
        subprocess.run([project_python(), str(Path(__file__).resolve()), *args, "--json",
                        str(out), "--no-table"], env=env_like_run_sh(env), check=True,
                       timeout=timeout, cwd=ROOT)
        return json.loads(out.read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder or .gguf (default: SmolLM2-135M GGUF)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (~2-3 min)")
    parser.add_argument("--batches", default="1,16", help="decode batch sizes (default 1,16)")
    parser.add_argument("--context", type=int, default=100, help="cached positions per row")
    parser.add_argument("--prefill-tokens", type=int, default=1024)
    parser.add_argument("--chunks", default="256,512,1024", help="prefill step sizes ('' = none)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--no-table", action="store_true", help="do not print the table")
    args = parser.parse_args(argv)

    lib = run_sh_preload()
    if lib and lib not in os.environ.get("LD_PRELOAD", "") and not os.environ.get(
            "STEP_PROFILE_REEXEC"):
        env = env_like_run_sh({"STEP_PROFILE_REEXEC": "1"})
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve())]
                  + list(argv if argv is not None else sys.argv[1:]), env)

    result = run(model_path=args.model, quick=args.quick,
                 batches=tuple(int(b) for b in args.batches.split(",") if b.strip()),
                 context=args.context, prefill_tokens=args.prefill_tokens,
                 chunks=tuple(int(c) for c in args.chunks.split(",") if c.strip()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    if not args.no_table:
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
