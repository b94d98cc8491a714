"""A quantized KV cache that keeps continuous batching.

mlx-lm quantizes a single sequence's KV cache (`QuantizedKVCache`, as its
`--kv-bits` does) but has no batched form of it, which is why its server
stops batching when the cache is quantized. `BatchQuantizedKVCache` is that
batched form: `BatchKVCache`'s left-padded layout (so mlx-lm's
`BatchGenerator` can merge, extend, filter and extract it), holding
`mx.quantize`d keys and values. Attention dispatches on its `bits`, so the
model runs mlx-lm's quantized attention unchanged.

llama.cpp's cache type names (`ModelOptions.CacheTypeKey/Value`) map onto
MLX's affine quantization: q8_0 -> 8 bits, q4_0/q4_1 -> 4 bits (group 32, as
llama.cpp's blocks), q5_0/q5_1 -> 5 bits; f16/bf16/f32 mean "not quantized".
"""

from typing import List, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models.cache import BatchKVCache, QuantizedKVCache, dynamic_roll

from .errors import InvalidArgument

# llama.cpp cache type -> (bits, group size); None: full precision.
CACHE_TYPES = {
    "": None, "f32": None, "f16": None, "bf16": None,
    "q8_0": (8, 32), "q5_0": (5, 32), "q5_1": (5, 32), "q4_0": (4, 32), "q4_1": (4, 32),
}
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


def kv_quantization(kv_bits: Optional[int], kv_group_size: int, quantized_kv_start: int,
                    cache_type_key: str = "", cache_type_value: str = ""
                    ) -> Optional[Tuple[int, int]]:
    """(bits, group size) from mlx-lm's options or llama.cpp's cache types,
    or None for a full-precision cache; a clear error for what MLX cannot do."""
    types = []
    for field, name in (("CacheTypeKey", cache_type_key), ("CacheTypeValue", cache_type_value)):
        name = (name or "").strip().lower()
        if name not in CACHE_TYPES:
            raise InvalidArgument(f"{field} {name!r} is not supported: use one of "
                                  f"{', '.join(k for k in CACHE_TYPES if k)}")
        types.append(CACHE_TYPES[name])
    if types[0] != types[1]:
        raise InvalidArgument("CacheTypeKey and CacheTypeValue must be the same: MLX "
                              "quantizes keys and values together")
    chosen = types[0]
    if kv_bits is not None:
        if kv_bits not in BITS:
            raise InvalidArgument(f"option 'kv_bits' must be one of {BITS}, got {kv_bits}")
        if kv_group_size not in GROUP_SIZES:
            raise InvalidArgument(f"option 'kv_group_size' must be one of {GROUP_SIZES}, "
                                  f"got {kv_group_size}")
        if chosen is not None and chosen[0] != kv_bits:
            raise InvalidArgument(f"option kv_bits:{kv_bits} contradicts CacheTypeKey "
                                  f"{cache_type_key!r}")
        chosen = (kv_bits, kv_group_size)
    if chosen is not None and quantized_kv_start != 0:
        raise InvalidArgument("option 'quantized_kv_start' must be 0: with continuous "
                              "batching every sequence in the batch shares one cache "
                              "format, so the cache is quantized from the first token")
    return chosen


def check_head_dim(model, group_size: int) -> None:
    """MLX quantizes along the head dimension in groups: it must divide."""
    args = getattr(model, "args", None)
    head_dim = getattr(args, "head_dim", None) or (
        args.hidden_size // args.num_attention_heads if args is not None else None)
    if head_dim and head_dim % group_size:
        raise InvalidArgument(f"a quantized KV cache with group size {group_size} needs a "
                              f"head dimension divisible by it; this model's is {head_dim}: "
                              f"set kv_group_size:32 (or 64) to fit")


def make_quantized_cache(num_layers: int, bits: int, group_size: int) -> list:
    """An empty per-sequence cache, one layer each, ready to join a batch."""
    return [batchable(QuantizedKVCache(group_size=group_size, bits=bits))
            for _ in range(num_layers)]


def batchable(layer: QuantizedKVCache) -> QuantizedKVCache:
    """Let mlx-lm's BatchGenerator merge this layer into a batch (it looks for
    a `merge` on the per-sequence cache)."""
    layer.merge = BatchQuantizedKVCache.merge
    return layer


def _slice(x: tuple, start: int, stop: int) -> tuple:
    return tuple(mx.contiguous(part[..., start:stop, :]) for part in x)


class BatchQuantizedKVCache(BatchKVCache):
    """`BatchKVCache` with quantized storage: keys and values are (packed,
    scales, biases) tuples, positions along axis 2 as in the float form."""

    def __init__(self, left_padding: List[int], group_size: int, bits: int):
        super().__init__(left_padding)
        self.group_size = group_size
        self.bits = bits

    def _empty_like(self, quantized: tuple, steps: int) -> tuple:
        return tuple(mx.zeros((*part.shape[:2], steps, part.shape[3]), part.dtype)
                     for part in quantized)

    def update_and_fetch(self, keys, values):
        keys = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        values = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        prev, steps = self._idx, keys[0].shape[2]
        if self.keys is None or prev + steps > self.keys[0].shape[2]:
            grow = (self.step + steps - 1) // self.step * self.step
            new_k, new_v = self._empty_like(keys, grow), self._empty_like(values, grow)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = tuple(mx.concatenate([old[..., :prev, :], new], axis=2)
                                  for old, new in zip(self.keys, new_k))
                self.values = tuple(mx.concatenate([old[..., :prev, :], new], axis=2)
                                    for old, new in zip(self.values, new_v))
        self.offset = self.offset + steps
        self._idx += steps
        for stored, new in zip(self.keys + self.values, keys + values):
            stored[..., prev:self._idx, :] = new
        return self.keys_and_values()

    def keys_and_values(self):
        return tree_map(lambda x: x[..., :self._idx, :], (self.keys, self.values))

    def finalize(self):
        if self._right_padding is not None:
            padding = self._right_padding
            self.keys, self.values = tree_map(
                lambda x: dynamic_roll(x, padding[:, None], axis=2), (self.keys, self.values))
            self.offset = self.offset - padding
            self.left_padding += padding
            self._right_padding = None

    def filter(self, batch_indices):
        if self.keys is not None:
            self.keys, self.values = tree_map(lambda x: x[batch_indices],
                                              (self.keys, self.values))
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = min(self.left_padding.tolist())
        if shift > 0:
            if self.keys is not None:
                self.keys, self.values = tree_map(lambda x: x[..., shift:, :],
                                                  (self.keys, self.values))
            self._idx -= shift
            self.left_padding -= shift

    def extend(self, other):
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        template = self.keys if self.keys is not None else other.keys
        v_template = self.values if self.values is not None else other.values
        max_idx = max(self._idx, other._idx)
        max_size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)

        def pad(c):
            k, v = c.keys, c.values
            if k is None:
                rows = c.offset.shape[0]
                k = tuple(mx.zeros((rows, *t.shape[1:2], 0, t.shape[3]), t.dtype)
                          for t in template)
                v = tuple(mx.zeros((rows, *t.shape[1:2], 0, t.shape[3]), t.dtype)
                          for t in v_template)
            left = max_idx - c._idx
            right = max_size - k[0].shape[2] - left
            if right < 0:
                k, v = tree_map(lambda x: x[..., :right, :], (k, v))
                right = 0
            if left or right:
                widths = [(0, 0), (0, 0), (left, right), (0, 0)]
                k, v = tree_map(lambda x: mx.pad(x, widths), (k, v))
            return k, v, c.offset, c.left_padding + left

        (k1, v1, o1, l1), (k2, v2, o2, l2) = pad(self), pad(other)
        self.keys = tuple(mx.concatenate([a, b]) for a, b in zip(k1, k2))
        self.values = tuple(mx.concatenate([a, b]) for a, b in zip(v1, v2))
        self.offset = mx.concatenate([o1, o2])
        self.left_padding = mx.concatenate([l1, l2])
        self._idx = max_idx

    def extract(self, idx):
        mx.eval(self.left_padding)
        padding = self.left_padding.tolist()[idx]
        layer = batchable(QuantizedKVCache(group_size=self.group_size, bits=self.bits))
        layer.keys = _slice(tuple(x[idx:idx + 1] for x in self.keys), padding, self._idx)
        layer.values = _slice(tuple(x[idx:idx + 1] for x in self.values), padding, self._idx)
        layer.offset = layer.keys[0].shape[2]
        return layer

    @staticmethod
    def merge(caches):
        """A batch from per-sequence `QuantizedKVCache`s (mlx-lm calls this)."""
        first = caches[0]
        lengths = [c.offset if c.keys is not None else 0 for c in caches]
        longest = max(lengths)
        if longest == 0:
            return BatchQuantizedKVCache([0] * len(caches), first.group_size, first.bits)
        padding = [longest - n for n in lengths]
        filled = next(c for c in caches if c.keys is not None)

        def stack(parts_of):
            out = []
            for j, part in enumerate(parts_of(filled)):
                batch = mx.zeros((len(caches), part.shape[1], longest, part.shape[3]),
                                 part.dtype)
                for i, (p, c) in enumerate(zip(padding, caches)):
                    if c.keys is not None:
                        batch[i:i + 1, :, p:p + c.offset] = parts_of(c)[j][..., :c.offset, :]
                out.append(batch)
            return tuple(out)

        cache = BatchQuantizedKVCache(padding, filled.group_size, filled.bits)
        cache.keys = stack(lambda c: c.keys)
        cache.values = stack(lambda c: c.values)
        cache.offset += longest
        cache._idx = longest
        return cache

    @property
    def nbytes(self):
        if self.keys is None:
            return 0
        return sum(x.nbytes for x in self.keys + self.values)


def compact_quantized(layer: QuantizedKVCache) -> None:
    """Keep only the positions a stored layer holds (see engine._compact)."""
    if layer.keys is not None and layer.keys[0].shape[2] > layer.offset:
        layer.keys = _slice(layer.keys, 0, layer.offset)
        layer.values = _slice(layer.values, 0, layer.offset)


def quantized_prefix(layer: QuantizedKVCache, keep: int) -> QuantizedKVCache:
    """A new layer with the first `keep` positions (copying only those)."""
    fresh = batchable(QuantizedKVCache(group_size=layer.group_size, bits=layer.bits))
    fresh.keys = _slice(layer.keys, 0, keep)
    fresh.values = _slice(layer.values, 0, keep)
    fresh.offset = keep
    return fresh
