"""The CPU fast path's llama blocks: compiled decode steps, attention as
compiled ops.

MLX's CPU backend fuses elementwise work (reshapes, RoPE's neighbours,
residual adds, the MLP's gate) only inside `mx.compile`. A block's decode step
is compiled as two pieces around what changes shape every step (the KV cache
update and attention): before it the norm, q/k/v and RoPE; after it o_proj,
the residuals, the second norm and the MLP.

Attention on the CPU is MLX's unfused fallback, whose softmax `exp` was most
of a long prompt's time. `attention` is that fallback op for op, with the
softmax as ops too, so its `exp` runs fused in a kernel built for this CPU
(native_kernels.py). So is the logsumexp that normalizes each step's logits.

Every piece is the same computation in the same order as mlx-lm's and MLX's
(tests check it to the bit), so greedy tokens stay the same. Prompt chunks,
whose lengths vary, run uncompiled (a new trace per length would cost more
than it saves).

Prompts prefilled together are right-padded to the longest, and the padding
costs as much as real tokens: a third of a batch of 8 chat prompts of 40-90
tokens. Everything but attention works row by row, so `FastBlock` runs the
norms, the projections and the MLP on the real rows alone, and RoPE, the KV
cache update and attention (where the padding is masked) on the padded
layout. A row's products come out the same whatever rows come with it, as
long as the BLAS routine is the same one (above 32 rows: tests check it), so
the bits stay the same.
"""

import functools
import importlib
import types

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama
from mlx_lm.models.cache import BatchKVCache

# The module (mlx_lm's package exports a function of the same name).
generate = importlib.import_module("mlx_lm.generate")

# Shapeless: one trace for every shape (a decode step's keys grow every step).
# Only elementwise ops: MLX's shapeless compile of the reductions too crashed.
_exp_minus = mx.compile(lambda x, m: mx.exp(x - m), shapeless=True)
_times_inverse = mx.compile(lambda e, s: e * (1 / s), shapeless=True)
_log_plus = mx.compile(lambda s, m: mx.where(mx.isinf(m), m, mx.log(s) + m), shapeless=True)


def softmax(x):
    """mx.softmax(x, axis=-1) to the bit (float32), as ops: its exp, fused by
    mx.compile, runs as a native kernel (native_kernels.py)."""
    e = _exp_minus(x, mx.max(x, axis=-1, keepdims=True))
    return _times_inverse(e, mx.sum(e, axis=-1, keepdims=True))


def logsumexp(x, axis=None, keepdims=False, **kwargs):
    """mx.logsumexp to the bit (float32), its last axis as ops like softmax
    above. mlx-lm normalizes every decode step's logits with it: over a
    49k vocabulary at 16 rows MLX's own took about 10% of the step."""
    if axis not in (-1, x.ndim - 1) or kwargs or x.dtype != mx.float32:
        return mx.logsumexp(x, axis=axis, keepdims=keepdims, **kwargs)
    m = mx.max(x, axis=-1, keepdims=True)
    out = _log_plus(mx.sum(_exp_minus(x, m), axis=-1, keepdims=True), m)
    return out if keepdims else out.squeeze(-1)


class _GenerateOps(types.ModuleType):
    """mlx.core as mlx-lm's generate module sees it on the CPU fast path:
    the same, but for logsumexp above."""

    logsumexp = staticmethod(logsumexp)

    def __getattr__(self, name):
        return getattr(mx, name)


def use_fast_logsumexp():
    """mlx-lm's generation normalizes logits with logsumexp above (the same
    bits): for the whole process, as mlx-lm's module is one per process."""
    if not isinstance(generate.mx, _GenerateOps):
        generate.mx = _GenerateOps("mlx.core")


# Products of up to 32 rows go to mlx_backend/blas/small_gemm.c, whose bits
# differ from OpenBLAS's: padding is skipped only when the real rows are more.
MIN_PACKED_ROWS = 33
_prepare = BatchKVCache.prepare


def _prepare_noting_lengths(self, **kwargs):
    """BatchKVCache.prepare, also noting where a right-padded prompt starts
    and its rows' lengths (mlx-lm passes them; the cache keeps only the
    padding), so FastBlock can tell the padding of each chunk."""
    _prepare(self, **kwargs)
    lengths = kwargs.get("lengths")
    self.padded_prompt = (self._idx, tuple(lengths)) if lengths else None


def note_prompt_lengths():
    """Let FastBlock skip prompt padding: for the whole process, as mlx-lm's
    cache class is one per process (nothing else changes)."""
    BatchKVCache.prepare = _prepare_noting_lengths


@functools.lru_cache(maxsize=64)
def _packing(counts: tuple, length: int):
    real = np.concatenate([np.arange(c) + b * length for b, c in enumerate(counts)])
    back = np.full(len(counts) * length, len(real))  # padding: the zero row after the real
    back[real] = np.arange(len(real))
    return mx.array(real, dtype=mx.uint32), mx.array(back, dtype=mx.uint32)


def real_rows(cache, batch: int, length: int):
    """For a right-padded prompt chunk about to enter `cache`: the flat
    positions (into batch * length) of its real tokens, and for every
    position its real row (or the zero row after them). None when there is
    no padding to skip or too few rows (MIN_PACKED_ROWS)."""
    noted = getattr(cache, "padded_prompt", None)
    if noted is None or type(cache) is not BatchKVCache or cache._right_padding is None:
        return None
    start, lengths = noted
    if len(lengths) != batch:
        return None
    done = cache._idx - start
    counts = tuple(min(max(n - done, 0), length) for n in lengths)
    real = sum(counts)
    if real == batch * length or real < MIN_PACKED_ROWS:
        return None
    return _packing(counts, length)


def attention(q, k, v, scale: float, mask):
    """mx.fast.scaled_dot_product_attention to the bit: MLX's own CPU
    fallback, op for op, with the softmax above."""
    B, H, L, D = q.shape
    n_kv = k.shape[1]
    rep = H // n_kv
    q = mx.array(scale, q.dtype) * q
    if rep > 1:
        q = q.reshape(B, n_kv, rep, L, D)
        k, v = mx.expand_dims(k, 2), mx.expand_dims(v, 2)
    scores = q @ k.swapaxes(-1, -2)
    if isinstance(mask, str):  # "causal"
        offset = max(k.shape[-2] - L, 0)
        mask = mx.arange(offset, offset + L)[:, None] >= mx.arange(k.shape[-2])[None]
    if mask is not None:
        if rep > 1 and mask.ndim >= 3:
            mask = mx.expand_dims(mask, -3) if mask.shape[-3] == 1 else \
                mask.reshape(*mask.shape[:-3], n_kv, rep, *mask.shape[-2:])
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        else:
            scores = scores + mask
    out = softmax(scores) @ v
    return out.reshape(B, H, L, D) if rep > 1 else out


class FastBlock(llama.TransformerBlock):
    """A llama block with the CPU fast path's steps (same parameters, same
    attributes: only the class of the instance changes)."""

    def _prepare(self):
        attn = self.self_attn

        def project(h, offset, B, L, spread=lambda t: t):
            """q and k (with RoPE) and v of the normed rows h, as (B, heads, L,
            head size); `spread` lays the rows out as B x L first."""
            def heads(t, n):
                return spread(t).reshape(B, L, n, -1).transpose(0, 2, 1, 3)
            q = heads(attn.q_proj(h), attn.n_heads)
            k = heads(attn.k_proj(h), attn.n_kv_heads)
            v = heads(attn.v_proj(h), attn.n_kv_heads)
            return attn.rope(q, offset=offset), attn.rope(k, offset=offset), v

        def finish(x, attended):
            """o_proj, the residuals and the MLP of rows x (attended: their
            heads side by side)."""
            h = x + attn.o_proj(attended)
            return h + self.mlp(self.post_attention_layernorm(h))

        def before(x, offset):
            return project(self.input_layernorm(x), offset, *x.shape[:2])

        def after(x, attended):
            B, L, _ = x.shape
            return finish(x, attended.transpose(0, 2, 1, 3).reshape(B, L, -1))

        self._project, self._finish = project, finish
        self._plain = (before, after)
        self._compiled = (mx.compile(before), mx.compile(after))

    def _padded_prompt(self, x, mask, cache, packing):
        """The plain steps on the real rows of a padded prompt chunk,
        attention on the padded layout (its padding is masked, so zeros do).
        Rows go back to the padded layout by a gather: MLX's scatter on the
        CPU is several times slower."""
        B, L, D = x.shape
        rows, back = packing

        def padded(t):
            return mx.concatenate([t, mx.zeros((1, t.shape[-1]), t.dtype)])[back]

        real = x.reshape(B * L, D)[rows]
        q, k, v = self._project(self.input_layernorm(real), cache.offset, B, L, padded)
        keys, values = cache.update_and_fetch(k, v)
        attended = attention(q, keys, values, self.self_attn.scale, mask)
        heads = attended.transpose(0, 2, 1, 3).reshape(B * L, -1)[rows]
        return padded(self._finish(real, heads)).reshape(B, L, D)

    def __call__(self, x, mask=None, cache=None):
        if cache is None or hasattr(cache, "bits"):  # quantized caches: mlx-lm's attention
            return super().__call__(x, mask, cache)
        if x.shape[1] > 1:
            packing = real_rows(cache, x.shape[0], x.shape[1])
            if packing is not None:
                return self._padded_prompt(x, mask, cache, packing)
        offset = cache.offset
        batched_decode = x.shape[1] == 1 and isinstance(offset, mx.array) \
            and type(cache) is BatchKVCache and not isinstance(mask, str)
        before, after = self._compiled if batched_decode else self._plain
        q, k, v = before(x, offset)
        keys, values = cache.update_and_fetch(k, v)
        attended = attention(q, keys, values, self.self_attn.scale, mask)
        return after(x, attended)


def speed_up_blocks(model) -> int:
    """Switch the plain llama blocks of `model` to FastBlock; returns how many.
    Anything else (other architectures, LoRA layers, sliding windows,
    quantized or sharded projections) is left as it is."""
    switched = 0
    for block in getattr(model, "layers", []):
        if type(block) is not llama.TransformerBlock or block.use_sliding:
            continue
        attn, mlp = block.self_attn, block.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                   mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if any(type(linear) is not nn.Linear for linear in linears) \
                or type(attn) is not llama.Attention or type(mlp) is not llama.MLP:
            continue
        block.__class__ = FastBlock
        block._prepare()
        switched += 1
    return switched
