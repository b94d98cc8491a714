"""Write tiny GGUF files with the `gguf` package, plus a numpy reference forward.

The reference follows llama.cpp's semantics directly (weights in GGUF layout,
rope applied to adjacent pairs for llama and to halves for qwen), so it checks
the importer's un-permutation of Q/K rows independently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

# --------------------------------------------------------------------------
# Vocabularies with a known segmentation
# --------------------------------------------------------------------------


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_USER_DEFINED = ["<tool>"]
BPE_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d",
              "Ġwor ld", "1 2", "Ġ t", "Ġt he"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class Vocab:
    tokens: List[str]
    types: List[int]
    merges: Optional[List[str]] = None
    scores: Optional[List[float]] = None
    model: str = "gpt2"
    pre: Optional[str] = "smollm"
    bos: int = 0
    eos: int = 2
    unk: Optional[int] = None
    eot: Optional[int] = None

    def id(self, token: str) -> int:
        return self.tokens.index(token)


def bpe_vocab(pre: str = "smollm", pad_to: int = 300) -> Vocab:
    """Specials, 256 byte symbols, merge results, a user-defined token, padding."""
    tokens = list(BPE_SPECIALS)
    types = [3] * len(tokens)
    alphabet = bytes_to_unicode()
    for b in range(256):
        tokens.append(alphabet[b])
        types.append(1)
    for merge in BPE_MERGES:
        tokens.append(merge.replace(" ", ""))
        types.append(1)
    tokens += BPE_USER_DEFINED
    types += [4] * len(BPE_USER_DEFINED)
    while len(tokens) < pad_to:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(4)
    return Vocab(tokens, types, merges=list(BPE_MERGES), pre=pre, bos=0,
                 eos=BPE_SPECIALS.index("<|im_end|>"), eot=None)


SPM_PIECES = [  # (piece, score): merges happen best score first
    ("he", -1.0), ("ll", -2.0), ("hell", -3.0), ("hello", -4.0), ("▁hello", -5.0),
    ("or", -6.0), ("▁w", -7.0), ("▁wor", -8.0), ("ld", -9.0), ("▁world", -10.0),
    ("▁", -20.0), ("h", -21.0), ("e", -22.0), ("l", -23.0), ("o", -24.0),
    ("w", -25.0), ("r", -26.0), ("d", -27.0), ("a", -28.0),
]


def spm_vocab(pad_to: int = 300) -> Vocab:
    """<unk>, <s>, </s>, 256 byte pieces <0xNN>, scored pieces, padding."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]
    scores = [0.0, 0.0, 0.0]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(6)
        scores.append(0.0)
    for piece, score in SPM_PIECES:
        tokens.append(piece)
        types.append(1)
        scores.append(score)
    while len(tokens) < pad_to:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(5)
        scores.append(-1000.0)
    return Vocab(tokens, types, scores=scores, model="llama", pre=None,
                 bos=1, eos=2, unk=0)


# --------------------------------------------------------------------------
# Model weights
# --------------------------------------------------------------------------


@dataclass
class Spec:
    arch: str = "llama"
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    head_dim: Optional[int] = None  # defaults to hidden // heads
    eps: float = 1e-5
    rope_base: float = 10000.0
    context: int = 256
    tie: bool = True
    seed: int = 0

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads


def make_weights(spec: Spec, vocab_size: int) -> Dict[str, np.ndarray]:
    """Random float32 weights in GGUF layout (numpy shape = (rows, cols))."""
    rng = np.random.default_rng(spec.seed)

    def lin(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    h, hd = spec.hidden, spec.hd
    w = {"token_embd.weight": rng.standard_normal((vocab_size, h)).astype(np.float32),
         "output_norm.weight": norm(h)}
    if not spec.tie:
        w["output.weight"] = lin(vocab_size, h)
    for i in range(spec.layers):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm(h)
        w[p + "attn_q.weight"] = lin(spec.heads * hd, h)
        w[p + "attn_k.weight"] = lin(spec.kv_heads * hd, h)
        w[p + "attn_v.weight"] = lin(spec.kv_heads * hd, h)
        w[p + "attn_output.weight"] = lin(h, spec.heads * hd)
        w[p + "ffn_norm.weight"] = norm(h)
        w[p + "ffn_gate.weight"] = lin(spec.ffn, h)
        w[p + "ffn_up.weight"] = lin(spec.ffn, h)
        w[p + "ffn_down.weight"] = lin(h, spec.ffn)
        if spec.arch == "qwen2":
            for k, n in (("q", spec.heads), ("k", spec.kv_heads), ("v", spec.kv_heads)):
                w[p + f"attn_{k}.bias"] = (0.1 * rng.standard_normal(n * hd)).astype(np.float32)
        if spec.arch == "qwen3":
            w[p + "attn_q_norm.weight"] = norm(hd)
            w[p + "attn_k_norm.weight"] = norm(hd)
    return w


# --------------------------------------------------------------------------
# Encoding tensors in a GGUF type; the reference uses what the file decodes to
# --------------------------------------------------------------------------

# f16 scale fields of K-quant blocks: (byte offset, multiple of d).  The "min"
# field is d times the mean quant level, so weights are zero-mean overall
# (a large common offset would make attention insensitive to rope).
_K_SCALE_FIELDS = {
    QT.Q2_K: ((80, 1.0), (82, 1.5)),
    QT.Q3_K: ((108, 1.0),),
    QT.Q4_K: ((0, 1.0), (2, 7.5)),
    QT.Q5_K: ((0, 1.0), (2, 15.5)),
    QT.Q6_K: ((208, 1.0),),
}


def encode(x: np.ndarray, qtype: QT, rng: np.random.Generator):
    """-> (array to hand to GGUFWriter, float32 values the file decodes to)."""
    if qtype == QT.F32:
        return x, x
    if qtype == QT.F16:
        data = x.astype(np.float16)
        return data, data.astype(np.float32)
    if qtype in _K_SCALE_FIELDS:
        data = random_k_blocks(x.shape, qtype, rng)
    elif qtype not in gguf.quants._type_traits:
        # A type gguf cannot decode (the importer must reject it): zero blocks.
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        data = np.zeros((x.shape[0], x.shape[1] // block * size), dtype=np.uint8)
        return data, np.full(x.shape, np.nan, dtype=np.float32)
    else:
        data = gguf.quants.quantize(x, qtype)
    return data, gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(x.shape)


def random_k_blocks(shape, qtype: QT, rng: np.random.Generator) -> np.ndarray:
    """gguf cannot quantize K-quants: random bits, then scales set for std ~ 1/sqrt(cols).

    Decoded values are linear in the block's f16 scale fields, so decode once
    with scales of 1, then rescale to the wanted magnitude.
    """
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    _set_k_scales(data, qtype, np.ones((rows, cols // block)))
    std = float(gguf.quants.dequantize(data.reshape(rows, -1), qtype).std()) or 1.0
    scale = rng.uniform(0.5, 1.5, size=(rows, cols // block)) / (np.sqrt(cols) * std)
    _set_k_scales(data, qtype, scale)
    return data.reshape(rows, -1)


def _set_k_scales(data: np.ndarray, qtype: QT, scale: np.ndarray) -> None:
    for off, mult in _K_SCALE_FIELDS[qtype]:
        data[..., off:off + 2] = (scale * mult).astype(np.float16)[..., None].view(np.uint8)


def _is_matrix(name: str, arr: np.ndarray) -> bool:
    return arr.ndim == 2


# --------------------------------------------------------------------------
# Writing the file
# --------------------------------------------------------------------------


@dataclass
class Fixture:
    path: Path
    spec: Spec
    vocab: Vocab
    weights: Dict[str, np.ndarray]  # float32, GGUF layout, as the file decodes
    rope_factors: Optional[np.ndarray] = None  # llama3-style rope_freqs tensor


def write_gguf(
    path,
    spec: Optional[Spec] = None,
    vocab: Optional[Vocab] = None,
    *,
    qtype: QT = QT.F32,
    types: Optional[Dict[str, QT]] = None,
    drop_keys: Iterable[str] = (),
    extra_keys: Optional[Dict[str, tuple]] = None,
    embedding_rows: Optional[int] = None,
    add_bos: Optional[bool] = False,
    chat_template: Optional[str] = CHAT_TEMPLATE,
    rope_factors: Optional[np.ndarray] = None,
) -> Fixture:
    """Write a tiny model: matrices in ``qtype`` (``types`` overrides per tensor)."""
    spec = spec or Spec()
    vocab = vocab or bpe_vocab()
    path = Path(path)
    rows = embedding_rows or len(vocab.tokens)
    weights = make_weights(spec, rows)
    rng = np.random.default_rng(spec.seed + 1)
    writer = gguf.GGUFWriter(str(path), spec.arch)
    meta = _metadata(spec, vocab, add_bos, chat_template)
    meta.update(extra_keys or {})
    for key in drop_keys:
        meta.pop(key, None)
    for key, (value, vtype, *sub) in meta.items():
        writer.add_key_value(key, value, vtype, sub[0] if sub else None)
    decoded = {}
    for name, arr in weights.items():
        t = (types or {}).get(name, qtype if _is_matrix(name, arr) else QT.F32)
        data, decoded[name] = encode(arr, t, rng)
        writer.add_tensor(name, data, raw_dtype=None if t in (QT.F32, QT.F16) else t)
    if rope_factors is not None:
        writer.add_tensor("rope_freqs.weight", rope_factors.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Fixture(path, spec, vocab, decoded, rope_factors)


def _metadata(spec: Spec, vocab: Vocab, add_bos, chat_template) -> Dict[str, tuple]:
    a = spec.arch
    meta = {
        f"{a}.block_count": (spec.layers, VT.UINT32),
        f"{a}.context_length": (spec.context, VT.UINT32),
        f"{a}.embedding_length": (spec.hidden, VT.UINT32),
        f"{a}.feed_forward_length": (spec.ffn, VT.UINT32),
        f"{a}.attention.head_count": (spec.heads, VT.UINT32),
        f"{a}.attention.head_count_kv": (spec.kv_heads, VT.UINT32),
        f"{a}.attention.layer_norm_rms_epsilon": (spec.eps, VT.FLOAT32),
        f"{a}.rope.freq_base": (spec.rope_base, VT.FLOAT32),
        f"{a}.rope.dimension_count": (spec.hd, VT.UINT32),
        "tokenizer.ggml.model": (vocab.model, VT.STRING),
        "tokenizer.ggml.tokens": (vocab.tokens, VT.ARRAY, VT.STRING),
        "tokenizer.ggml.token_type": (vocab.types, VT.ARRAY, VT.INT32),
        "tokenizer.ggml.bos_token_id": (vocab.bos, VT.UINT32),
        "tokenizer.ggml.eos_token_id": (vocab.eos, VT.UINT32),
    }
    if spec.head_dim:
        meta[f"{a}.attention.key_length"] = (spec.hd, VT.UINT32)
        meta[f"{a}.attention.value_length"] = (spec.hd, VT.UINT32)
    if vocab.pre is not None:
        meta["tokenizer.ggml.pre"] = (vocab.pre, VT.STRING)
    if vocab.merges is not None:
        meta["tokenizer.ggml.merges"] = (vocab.merges, VT.ARRAY, VT.STRING)
    if vocab.scores is not None:
        meta["tokenizer.ggml.scores"] = (vocab.scores, VT.ARRAY, VT.FLOAT32)
    if vocab.unk is not None:
        meta["tokenizer.ggml.unknown_token_id"] = (vocab.unk, VT.UINT32)
    if vocab.eot is not None:
        meta["tokenizer.ggml.eot_token_id"] = (vocab.eot, VT.UINT32)
    if add_bos is not None:
        meta["tokenizer.ggml.add_bos_token"] = (bool(add_bos), VT.BOOL)
    if chat_template:
        meta["tokenizer.chat_template"] = (chat_template, VT.STRING)
    return meta


def patch_tensor_type(path: Path, tensor_name: str, new_type: int) -> None:
    """Overwrite one tensor's type id in the tensor table (for bad-input tests)."""
    data = bytearray(Path(path).read_bytes())
    name = tensor_name.encode()
    pos = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(data[pos:pos + 4], "little")
    type_pos = pos + 4 + 8 * n_dims
    data[type_pos:type_pos + 4] = int(new_type).to_bytes(4, "little")
    Path(path).write_bytes(bytes(data))


# --------------------------------------------------------------------------
# numpy reference forward (llama.cpp semantics)
# --------------------------------------------------------------------------


def _rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, base, interleaved, factors=None):
    """x: (T, heads, d).  llama.cpp NORM mode rotates pairs (2i, 2i+1); NEOX (i, i+d/2).

    ``factors`` (rope_freqs) divide each pair's frequency, as ggml_rope_ext does.
    """
    t, _, d = x.shape
    inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    if factors is not None:
        inv = inv / factors
    ang = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., : d // 2], x[..., d // 2:]
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(x)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., : d // 2], out[..., d // 2:] = ra, rb
    return out


def reference_logits(fx: Fixture, tokens: Sequence[int]) -> np.ndarray:
    """Logits (T, vocab) computed in float64 from the decoded GGUF weights."""
    s, w = fx.spec, {k: v.astype(np.float64) for k, v in fx.weights.items()}
    hd, t = s.hd, len(tokens)
    x = w["token_embd.weight"][list(tokens)]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(s.layers):
        p = f"blk.{i}."
        h = _rms_norm(x, w[p + "attn_norm.weight"], s.eps)
        q = h @ w[p + "attn_q.weight"].T + w.get(p + "attn_q.bias", 0.0)
        k = h @ w[p + "attn_k.weight"].T + w.get(p + "attn_k.bias", 0.0)
        v = h @ w[p + "attn_v.weight"].T + w.get(p + "attn_v.bias", 0.0)
        q, k, v = q.reshape(t, s.heads, hd), k.reshape(t, s.kv_heads, hd), v.reshape(t, s.kv_heads, hd)
        if s.arch == "qwen3":
            q = _rms_norm(q, w[p + "attn_q_norm.weight"], s.eps)
            k = _rms_norm(k, w[p + "attn_k_norm.weight"], s.eps)
        interleaved = s.arch == "llama"
        q = _rope(q, s.rope_base, interleaved, fx.rope_factors)
        k = _rope(k, s.rope_base, interleaved, fx.rope_factors)
        rep = s.heads // s.kv_heads
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", att, v).reshape(t, s.heads * hd)
        x = x + o @ w[p + "attn_output.weight"].T
        h = _rms_norm(x, w[p + "ffn_norm.weight"], s.eps)
        g, u = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T
    x = _rms_norm(x, w["output_norm.weight"], s.eps)
    head = w.get("output.weight", w["token_embd.weight"])
    return x @ head.T
