"""The raw baseline: `mlx_lm.stream_generate` on the weights the server uses.

Started by bench/run.py as a subprocess with the environment run.sh gives the
server (LD_PRELOAD of OpenBLAS and its forwarders on Linux when present),
so both sides run the same BLAS. The model is loaded with the server's own loader
(`mlx_backend.model_loader.load_model`), after the server's
`native_kernels.enable()`, so the GGUF import and the CPU fast path
(dequantize to float32, its blocks, fused kernels built for this CPU) are
identical.

Protocol, one JSON object per line: the worker prints {"ready": ...} once
loaded, then answers each {"tokens": [...], "max_tokens": N} read from stdin
with the timeline of one greedy generation (EOS ignored, like IgnoreEOS), and
each {"batch": [[...], ...], "max_tokens": N} with the aggregate decode rate of
those prompts decoded together by mlx-lm's BatchGenerator (the server's engine
without the server: same batch sizes and prefill step as its defaults).
"""

import json
import os
import sys
import time


def main():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    args = parser.parse_args()

    from mlx_backend import native_kernels

    native_kernels.enable()  # as the server does, before MLX builds any kernel
    import mlx.core as mx
    import mlx_lm

    from mlx_backend.model_loader import blas_library, load_model, on_cpu
    from mlx_backend.options import ModelSettings
    from mlx_backend.request import LoadRequest

    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but protocol lines on the real stdout

    loaded = load_model(LoadRequest(args.model), ModelSettings())
    tokenizer = loaded.tokenizer
    tokenizer.eos_token_ids = []  # IgnoreEOS: run to max_tokens like the server requests
    device = mx.default_device()
    info = {
        "ready": True,
        "device": "cpu" if on_cpu() else "gpu",
        "device_repr": str(device),
        "blas": blas_library() if on_cpu() else None,
        "weight_format": loaded.weight_format,
        "weights_bytes": loaded.weights_bytes,
        "load_s": loaded.load_seconds,
        "mlx_version": mx.__version__,
        "mlx_lm_version": getattr(mlx_lm, "__version__", None),
        "ld_preload": os.environ.get("LD_PRELOAD"),
    }
    try:
        if not on_cpu():
            info["device_info"] = {k: str(v) for k, v in mx.device_info().items()}
    except Exception:  # older/newer MLX without device_info
        pass
    print(json.dumps(info), file=out, flush=True)

    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        if job.get("quit"):
            break
        if "batch" in job:
            print(json.dumps(batch(loaded.model, job["batch"], job["max_tokens"])),
                  file=out, flush=True)
            continue
        times = []
        last = None
        t0 = time.perf_counter()
        for response in mlx_lm.stream_generate(loaded.model, tokenizer, job["tokens"],
                                                max_tokens=job["max_tokens"]):
            times.append(time.perf_counter())
            last = response
        n = len(times)
        decode = (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else None
        print(json.dumps({
            "tokens": n,
            "ttft_s": times[0] - t0 if times else None,
            "total_s": times[-1] - t0 if times else None,
            "decode_tps": decode,
            "mlx_generation_tps": last.generation_tps if last else None,
            "mlx_prompt_tps": last.prompt_tps if last else None,
        }), file=out, flush=True)


def batch(model, prompts, max_tokens):
    """Decode prompts together with BatchGenerator; rates as the bench computes them
    for server streams (steady: while all are decoding; phase: first to last token)."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from mlx_backend.options import ModelSettings

    s = ModelSettings()
    gen = BatchGenerator(model, completion_batch_size=s.max_batch_size,
                         prefill_batch_size=min(s.prefill_batch_size, s.max_batch_size),
                         prefill_step_size=s.prefill_step_size,
                         stream=mx.new_stream(mx.default_device()))
    try:
        uids = gen.insert(prompts, max_tokens=[max_tokens] * len(prompts))
        series = {uid: [] for uid in uids}
        done = set()
        while len(done) < len(uids):
            _, responses = gen.next()
            now = time.perf_counter()
            for r in responses:
                points = series[r.uid]
                points.append((now, len(points) + 1))
                if r.finish_reason is not None:
                    done.add(r.uid)
    finally:
        gen.close()
    firsts = [p[0][0] for p in series.values()]
    lasts = [p[-1][0] for p in series.values()]

    def at(points, t):
        count = 0
        for when, n in points:
            if when > t:
                break
            count = n
        return count

    t0, t1 = max(firsts), min(lasts)
    steady = None
    if t1 > t0:
        made = sum(at(p, t1) - at(p, t0) for p in series.values())
        steady = made / (t1 - t0) if made else None
    start, end = min(firsts), max(lasts)
    phase = sum(p[-1][1] - 1 for p in series.values()) / (end - start) if end > start else None
    return {"streams": len(prompts), "tokens": sum(p[-1][1] for p in series.values()),
            "steady_tps": steady, "phase_tps": phase,
            "steady_window_s": t1 - t0 if t1 > t0 else None}


if __name__ == "__main__":
    main()
