"""mlx_backend/cpu_blocks.py: the CPU fast path's blocks give exactly mlx-lm's
tokens and KV caches (also when they skip prompt padding), and its attention
exactly MLX's."""

import importlib
import re

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator, PromptProcessingBatch
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

from mlx_backend import cpu_blocks
from mlx_backend.cpu_blocks import (FastBlock, attention, logsumexp, softmax, speed_up_blocks,
                                    use_fast_logsumexp)

from .conftest import ROOT, blas_preload, load, run_preloaded

PLAIN = ("compile_decode:false",)


def greedy(model, prompts, tokens=24, prefill_step_size=2048):
    generator = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=8,
                               prefill_step_size=prefill_step_size,
                               stream=mx.new_stream(mx.default_device()))
    uids = generator.insert(prompts, max_tokens=[tokens] * len(prompts))
    out = {uid: [] for uid in uids}
    while any(len(t) < tokens for t in out.values()):
        for response in generator.next()[1]:
            out[response.uid].append(response.token)
    generator.close()
    return [out[uid] for uid in uids]


def test_fast_blocks_decode_the_same_tokens(tiny_model, loaded):
    plain = load(tiny_model, *PLAIN)
    fast = loaded  # the default options: the fast path on the CPU
    assert not any(isinstance(b, FastBlock) for b in plain.model.layers)
    if not all(isinstance(b, FastBlock) for b in fast.model.layers):
        assert mx.default_device() != mx.cpu  # the fast path is for the CPU only
        return
    assert "CPU fast path" in fast.weight_format
    # Rows of different lengths: left padding, so masks are arrays; a prompt
    # of several chunks.
    long = [(i * 7 + 3) % 200 + 1 for i in range(150)]
    prompts = [[1, 5, 9, 13, 2], [7, 3], [11, 4, 8, 19, 23, 5, 6, 30, 2], long]
    assert greedy(fast.model, prompts[:1]) == greedy(plain.model, prompts[:1])
    assert greedy(fast.model, [long], prefill_step_size=64) == \
        greedy(plain.model, [long], prefill_step_size=64)
    assert greedy(fast.model, prompts) == greedy(plain.model, prompts)
    # Same parameters, same names: nothing else sees a difference.
    assert [k for k, _ in tree_flatten(fast.model.parameters())] == \
        [k for k, _ in tree_flatten(plain.model.parameters())]


def _prefilled(model, prompts, step, cached=0):
    """Caches of `prompts` prefilled together (right-padded, as mlx-lm does),
    the first `cached` tokens of the second prompt already in its cache."""
    caches = [make_prompt_cache(model) for _ in prompts]
    rest = [list(p) for p in prompts]
    if cached:
        model(mx.array([rest[1][:cached]]), cache=caches[1])
        rest[1] = rest[1][cached:]
    batch = PromptProcessingBatch(model, list(range(len(prompts))), caches,
                                  prefill_step_size=step)
    batch.prompt(rest)
    return batch.prompt_cache


@pytest.mark.parametrize("step,cached", [(2048, 0), (32, 0), (2048, 30)])
def test_padded_prompts_skip_the_padding_to_the_bit(tiny_model, loaded, monkeypatch, step,
                                                    cached):
    if not all(isinstance(b, FastBlock) for b in loaded.model.layers):
        assert mx.default_device() != mx.cpu
        return
    plain = load(tiny_model, *PLAIN)
    skipped = []
    real_rows = cpu_blocks.real_rows

    def spy(cache, batch, length):
        packing = real_rows(cache, batch, length)
        if type(cache) is BatchKVCache:  # not the cached prefix of one prompt
            skipped.append(packing is not None)
        return packing

    monkeypatch.setattr(cpu_blocks, "real_rows", spy)
    lengths = [20, 90, 50, 70, 3]
    prompts = [[(i * 13 + j * 7) % 200 + 1 for j in range(n)] for i, n in enumerate(lengths)]
    fast = _prefilled(loaded.model, prompts, step, cached)
    assert any(skipped)  # by chunk (step 32): some chunks have too few real rows
    assert all(skipped) == (step == 2048)
    for got, want in zip(fast, _prefilled(plain.model, prompts, step, cached)):
        assert got.left_padding.tolist() == want.left_padding.tolist()
        assert got._idx == want._idx and got.offset.tolist() == want.offset.tolist()
        for row, pad in enumerate(got.left_padding.tolist()):
            assert mx.array_equal(got.keys[row, :, pad:got._idx], want.keys[row, :, pad:got._idx])
            assert mx.array_equal(got.values[row, :, pad:got._idx],
                                  want.values[row, :, pad:got._idx])
    if not cached:
        assert greedy(loaded.model, prompts, 8, step) == greedy(plain.model, prompts, 8, step)


def test_real_rows_of_a_padded_prompt():
    cpu_blocks.note_prompt_lengths()
    cache = BatchKVCache([0, 0, 0])
    cache.prepare(lengths=[60, 80, 45], right_padding=[20, 0, 35])
    assert cpu_blocks.real_rows(cache, 3, 40) is None  # the first chunk of 40: no padding
    assert cpu_blocks.real_rows(cache, 2, 80) is None  # not this batch
    cache.update_and_fetch(mx.zeros((3, 1, 40, 4)), mx.zeros((3, 1, 40, 4)))
    rows, back = cpu_blocks.real_rows(cache, 3, 40)  # the second: 20, 40 and 5 real
    assert rows.tolist() == list(range(20)) + list(range(40, 80)) + list(range(80, 85))
    assert back.tolist() == list(range(20)) + [65] * 20 + list(range(20, 65)) + [65] * 35
    cache.prepare(lengths=[10, 20, 2], right_padding=[10, 0, 18])
    assert cpu_blocks.real_rows(cache, 3, 20) is None  # 32 of 60: too few real rows
    cache.prepare(lengths=[10, 20, 3], right_padding=[10, 0, 17])
    assert cpu_blocks.real_rows(cache, 3, 20)[0].size == 33
    cache.finalize()
    assert cpu_blocks.real_rows(cache, 3, 40) is None


# Under run.sh's preload: the rows of products of 33 rows or more (OpenBLAS's)
# have the same bits beside any other rows, at the default model's shapes.
ROWS_PROBE = r"""
import numpy as np, mlx.core as mx
rng = np.random.default_rng(0)
x = mx.array(rng.standard_normal((700, 1536), dtype=np.float32))
for n, k in ((576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)):
    w = mx.array(rng.standard_normal((n, k), dtype=np.float32))
    whole = np.array(x[:, :k] @ w.T)
    for m in (33, 57, 128, 491, 667):
        for i in (0, 13, 700 - m):
            assert np.array_equal(np.array(x[i:i + m, :k] @ w.T), whole[i:i + m]), (n, k, m, i)
print("ok")
"""


def test_skipped_padding_keeps_the_bits_of_run_sh_blas(blas_home):
    preload = blas_preload(blas_home)
    if not preload:
        pytest.skip("run.sh preloads no BLAS on this machine")
    done = run_preloaded(ROWS_PROBE, preload)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    # Fewer rows go to small_gemm.c (other bits): padding is skipped only above them
    source = (ROOT / "mlx_backend" / "blas" / "small_gemm.c").read_text()
    most = int(re.search(r"MAX_ROWS = (\d+)", source).group(1))
    assert cpu_blocks.MIN_PACKED_ROWS == most + 1


def _qkv(B, H, n_kv, L, S, D=16, seed=0):
    keys = mx.random.split(mx.random.key(seed), 3)
    return (mx.random.normal((B, H, L, D), key=keys[0]),
            mx.random.normal((B, n_kv, S, D), key=keys[1]),
            mx.random.normal((B, n_kv, S, D), key=keys[2]))


@pytest.mark.parametrize("B,H,L,S", [(1, 9, 1, 40), (3, 9, 1, 40), (1, 9, 7, 40), (2, 6, 64, 100),
                                     (1, 3, 64, 64)])
@pytest.mark.parametrize("mask", [None, "bool", "bool-heads", "additive", "causal"])
def test_attention_is_mlx_attention_to_the_bit(B, H, L, S, mask):
    q, k, v = _qkv(B, H, 3, L, S, D=64, seed=B * 100 + L)
    m = {None: None, "causal": "causal",
         "bool": mx.random.uniform(shape=(B, 1, L, S), key=mx.random.key(7)) > 0.3,
         "bool-heads": mx.random.uniform(shape=(B, H, L, S), key=mx.random.key(8)) > 0.3,
         "additive": mx.random.normal((B, 1, L, S), key=mx.random.key(9))}[mask]
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=m)
    assert mx.array_equal(attention(q, k, v, 0.125, m), want)


def test_softmax_is_mlx_softmax_to_the_bit():
    x = mx.concatenate([mx.random.normal((4, 7, 300), key=mx.random.key(1)) * 30,
                        mx.full((4, 7, 5), mx.finfo(mx.float32).min)], axis=-1)
    for rows in (x, x[:, :1], x[..., :33]):  # one trace serves every shape
        assert mx.array_equal(softmax(rows), mx.softmax(rows, axis=-1, precise=True))


def test_logsumexp_is_mlx_logsumexp_to_the_bit():
    x = mx.random.normal((16, 4000), key=mx.random.key(3)) * 8
    inf = float("inf")
    rows = mx.concatenate([x, mx.full((1, 4000), -inf), mx.full((1, 4000), inf),
                           mx.where(mx.arange(4000) % 7 == 0, x[:1], -inf)])
    for t in (rows, rows[:1], rows[:, :33]):
        for keepdims in (True, False):
            assert mx.array_equal(logsumexp(t, axis=-1, keepdims=keepdims),
                                  mx.logsumexp(t, axis=-1, keepdims=keepdims))
    assert mx.array_equal(logsumexp(x, keepdims=True), mx.logsumexp(x, keepdims=True))
    use_fast_logsumexp()
    generate = importlib.import_module("mlx_lm.generate")
    assert generate.mx.logsumexp is logsumexp and generate.mx.array is mx.array


def test_only_plain_llama_blocks_are_switched(tiny_model):
    model = load(tiny_model, *PLAIN).model
    block = model.layers[0]
    block.self_attn.q_proj = nn.QuantizedLinear.from_linear(block.self_attn.q_proj)
    assert speed_up_blocks(model) == len(model.layers) - 1
    assert not isinstance(model.layers[0], FastBlock)
    assert speed_up_blocks(nn.Linear(4, 4)) == 0
