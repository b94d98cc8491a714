"""Convert GGUF tensors into arrays an MLX model folder holds.

- F32 / F16 / BF16 are copied as they are (F64 becomes float32).
- Q4_0, Q4_1 and Q8_0 are repacked bit-exactly into MLX affine quantized
  triples (weight, scales, biases) with group size 32.
- Every other type the ``gguf`` package can dequantize (K-quants, Q5_x,
  IQ-quants, ...) is dequantized to float16, or re-quantized with
  ``mx.quantize`` when ``requant_bits`` is given.
- llama GGUFs store Q/K rows in llama.cpp's interleaved rotary order;
  ``unpermute_rows`` puts them back in Hugging Face order, so mlx-lm's
  default rope applies.

Conversion works on numpy views of the memory-mapped file, one tensor at a
time, so memory stays bounded by the largest tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from .reader import GGUFFile, TensorInfo

_NATIVE_QUANTS = ("Q4_0", "Q4_1", "Q8_0")


@dataclass
class Converted:
    """numpy arrays for one parameter: {'weight': ...} or a quantized triple."""

    arrays: Dict[str, np.ndarray]
    bits: Optional[int] = None
    group_size: Optional[int] = None
    bf16: bool = False  # 'weight' holds bfloat16 bits as uint16
    dequantized: bool = False


def convert_tensor(gguf: GGUFFile, info: TensorInfo) -> Converted:
    """Decode one GGUF tensor to numpy: native float, MLX triple, or float16."""
    from gguf.constants import GGMLQuantizationType

    qtype = GGMLQuantizationType(info.ggml_type)
    raw = gguf.raw(info)
    if qtype.name == "F32":
        return Converted({"weight": raw.view(np.float32).reshape(info.shape)})
    if qtype.name == "F16":
        return Converted({"weight": raw.view(np.float16).reshape(info.shape)})
    if qtype.name == "BF16":
        return Converted({"weight": raw.view(np.uint16).reshape(info.shape)}, bf16=True)
    if qtype.name == "F64":
        return Converted({"weight": raw.view(np.float64).astype(np.float32).reshape(info.shape)})
    if qtype.name in _NATIVE_QUANTS and len(info.shape) == 2:
        triple = _repack_native(qtype.name, raw, info.shape)
        if triple is not None:
            return triple
    return Converted({"weight": _dequantize(raw, qtype, info.shape)}, dequantized=True)


def to_float32(gguf: GGUFFile, info: TensorInfo) -> np.ndarray:
    """Any tensor as float32 values, for checks that read weights (rope_freqs)."""
    from gguf.constants import GGMLQuantizationType

    conv = convert_tensor(gguf, info)
    if conv.bf16:
        return (conv.arrays["weight"].astype(np.uint32) << 16).view(np.float32)
    if "scales" in conv.arrays:
        return _dequantize(gguf.raw(info), GGMLQuantizationType(info.ggml_type), info.shape)
    return conv.arrays["weight"].astype(np.float32)


def _dequantize(raw: np.ndarray, qtype, shape) -> np.ndarray:
    from gguf.quants import dequantize

    values = dequantize(np.ascontiguousarray(raw), qtype).reshape(shape)
    return values.astype(np.float16) if len(shape) == 2 else values.astype(np.float32)


def _repack_native(kind: str, raw: np.ndarray, shape) -> Optional[Converted]:
    """Q4_0/Q4_1/Q8_0 blocks of 32 -> MLX affine (w = scale * q + bias), bit-exact."""
    rows, cols = shape
    block_bytes = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
    blocks = raw.reshape(rows, cols // 32, block_bytes)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    if kind == "Q8_0":
        # int8 q -> uint8 q + 128: flipping the sign bit is exactly that.
        q = np.ascontiguousarray(blocks[..., 2:34]) ^ np.uint8(0x80)
        packed = q.reshape(rows, cols).view(np.uint32)
        bias = d.astype(np.float32) * -128.0
        bits = 8
    else:
        start = 2 if kind == "Q4_0" else 4
        qs = blocks[..., start:start + 16]
        # GGUF: byte i holds element i (low nibble) and element i + 16 (high).
        vals = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
        # MLX: element j sits at bits 4 * (j % 8) of little-endian word j // 8.
        packed = (vals[..., 0::2] | (vals[..., 1::2] << 4)).astype(np.uint8)
        packed = np.ascontiguousarray(packed).reshape(rows, cols // 2).view(np.uint32)
        if kind == "Q4_0":
            bias = d.astype(np.float32) * -8.0
        else:
            bias = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)
        bits = 4
    bias16 = bias.astype(np.float16)
    if not (np.isfinite(d).all() and np.isfinite(bias16).all()):
        return None  # out of float16 range: fall back to dequantizing
    return Converted({"weight": packed, "scales": d, "biases": bias16}, bits=bits, group_size=32)


def unpermute_rows(conv: Converted, heads: int) -> Converted:
    """Undo llama.cpp's interleaved rotary row order (per head: 0, d/2, 1, d/2+1, ...)."""
    out = {}
    for key, arr in conv.arrays.items():
        rows = arr.shape[0]
        rest = arr.shape[1:]
        out[key] = np.ascontiguousarray(
            arr.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(arr.shape)
        )
    return Converted(out, conv.bits, conv.group_size, conv.bf16, conv.dequantized)


def to_mlx(conv: Converted, requant_bits, requant_group_size) -> Tuple[dict, Optional[tuple]]:
    """numpy -> mx arrays; optionally re-quantize tensors that were dequantized."""
    import mlx.core as mx

    weight = conv.arrays["weight"]
    if conv.bf16:
        return {"weight": mx.array(weight).view(mx.bfloat16)}, None
    if (conv.dequantized and requant_bits is not None and weight.ndim == 2
            and weight.shape[1] % requant_group_size == 0):
        w = mx.array(weight.astype(np.float16))
        q, scales, biases = mx.quantize(w, group_size=requant_group_size, bits=requant_bits)
        return {"weight": q, "scales": scales, "biases": biases}, (requant_bits, requant_group_size)
    arrays = {k: mx.array(v) for k, v in conv.arrays.items()}
    quant = (conv.bits, conv.group_size) if conv.bits else None
    return arrays, quant
