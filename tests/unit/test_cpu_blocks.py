"""mlx_backend/cpu_blocks.py: the CPU fast path's blocks give exactly mlx-lm's
tokens, and its attention exactly MLX's."""

import importlib

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator

from mlx_backend.cpu_blocks import (FastBlock, attention, logsumexp, softmax, speed_up_blocks,
                                    use_fast_logsumexp)

from .conftest import load

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
