"""KV caches as the engine stores and serves them: their length, their
size, a compact copy for the prompt cache, and a copy of a prefix.

Plain functions over mlx-lm's cache objects (full precision, rotating and
quantized), shared by the engine and the prompt cache's hooks.
"""

import copy
import os
from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache, trim_prompt_cache

from .kv_quant import compact_quantized, quantized_prefix


def kv_length(cache) -> Optional[int]:
    offsets = {getattr(layer, "offset", None) for layer in cache}
    return offsets.pop() if len(offsets) == 1 else None


def compact(cache):
    """Make a cache hold only its own positions before it is stored.

    KV state extracted from a batch is a lazy view of the whole batch buffer
    until evaluated, and a standalone KVCache grows in 256-position steps;
    either way the stored entry would pin far more memory than it reports.
    """
    for layer in cache:
        keys = getattr(layer, "keys", None)
        if isinstance(layer, QuantizedKVCache):
            compact_quantized(layer)
        elif isinstance(layer, KVCache) and keys is not None and keys.shape[2] > layer.offset:
            layer.keys = mx.contiguous(keys[..., :layer.offset, :])
            layer.values = mx.contiguous(layer.values[..., :layer.offset, :])
    mx.eval([layer.state for layer in cache])


def kv_prefix(cache, keep: int):
    """A new cache holding the first `keep` positions of `cache`, copying only
    those (a longer prompt-cache match, or a copy of a pinned checkpoint)."""
    if all(type(layer) is QuantizedKVCache for layer in cache):
        out = [quantized_prefix(layer, keep) for layer in cache]
        mx.eval([layer.state for layer in out])
        return out
    if not all(type(layer) is KVCache for layer in cache):  # rotating, ...
        copied = copy.deepcopy(cache)
        trim_prompt_cache(copied, kv_length(copied) - keep)
        return copied
    out = []
    for layer in cache:
        fresh = KVCache()
        fresh.keys = mx.contiguous(layer.keys[..., :keep, :])
        fresh.values = mx.contiguous(layer.values[..., :keep, :])
        fresh.offset = keep
        out.append(fresh)
    mx.eval([layer.state for layer in out])
    return out


# A longer match copies part of a stored cache; below this many tokens the
# copy is not worth making (computing two tokens costs about what copying does).
MIN_LONGER_KEEP = 2


def cache_nbytes(cache) -> int:
    return sum(layer.nbytes for layer in cache)


def default_cache_bytes() -> int:
    """A quarter of the memory available now (bounded KV cache by default)."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        available = 8 * 2**30
    return max(available // 4, 64 * 2**20)
