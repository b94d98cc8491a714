"""Turn GGUF metadata into an mlx-lm config.json and GGUF tensor names into mlx-lm names.

``plan_import`` checks everything that can be checked before a byte is
written: the architecture is one mlx-lm can load (llama, qwen2, qwen3), every
size the metadata declares is in range (through ``reader.bounded``) and agrees
with the tensor shapes, rope settings are ones mlx-lm reproduces (no partial
rotary; linear, yarn and llama3 scaling), the vocabulary matches the
embedding, and the (lazy) mlx-lm model has exactly the parameters the file
holds.  A file that passes yields an ``ImportPlan``; anything else raises
``GGUFImportError``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from .reader import Corrupt, GGUFFile, GGUFImportError, bounded, show
from .repack import to_float32

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# GGUF tensors that carry no weights mlx-lm needs (handled through config).
_IGNORED_TENSORS = {"rope_freqs.weight"}
_IGNORED_BLOCK_TENSORS = {"attn_rot_embd"}

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")


# Sane bounds for architecture values; the tensors must also agree with them.
_MAX_LAYERS = 1024
_MAX_HEADS = 4096
_MAX_HEAD_DIM = 4096
_MAX_WIDTH = 1 << 20  # embedding_length, feed_forward_length
_MAX_VOCAB = 1 << 22
_MAX_CONTEXT = 1 << 31


@dataclass
class ImportPlan:
    """What the importer writes: config.json, the tensors to convert, the tokenizer."""

    config: dict
    names: Dict[str, str]  # GGUF tensor name -> mlx-lm parameter name
    permute_heads: Dict[str, int]  # GGUF tensor name -> heads to un-interleave
    tokenizer: object  # tokenizer.TokenizerFiles


def plan_import(gguf: GGUFFile) -> ImportPlan:
    """Validate everything that can be checked before writing any file.

    Metadata values of the wrong type or range surface here as GGUFImportError
    too: nothing a file declares may escape as another exception.
    """
    try:
        return _plan(gguf)
    except Corrupt as err:
        raise GGUFImportError(f"{gguf.path}: invalid metadata: {err}") from None
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as err:
        raise GGUFImportError(
            f"{gguf.path}: invalid metadata ({type(err).__name__}: {err})"
        ) from None


def _plan(gguf: GGUFFile) -> ImportPlan:
    # imported here: `tokenizers` is only needed once a GGUF file is imported
    from .tokenizer import TokenizerBuildError, build_tokenizer_files

    path = gguf.path
    raw_arch = gguf.metadata.get("general.architecture")
    if raw_arch is None or (isinstance(raw_arch, str) and not raw_arch):
        raise GGUFImportError(f"{path}: missing required metadata key 'general.architecture'")
    arch = raw_arch if isinstance(raw_arch, str) else show(raw_arch)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(
            f"{path}: unsupported architecture '{arch}' "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    splits = _meta_int(gguf, "split.count", 0, 1 << 16, default=1)
    if splits > 1:
        raise GGUFImportError(
            f"{path}: split GGUF ({splits} parts) is not supported; merge it with "
            "llama-gguf-split --merge first"
        )
    _check_tensor_types(gguf)
    names = _map_tensor_names(gguf)
    config = _build_config(gguf, names)
    _check_vocab(gguf, config)  # before the tokenizer: that is the costly part
    try:
        tokenizer = build_tokenizer_files(gguf.metadata)
    except TokenizerBuildError as err:
        raise GGUFImportError(f"{path}: {err}") from None
    _check_against_model(gguf, config, names)
    config["bos_token_id"] = tokenizer.bos_token_id
    if tokenizer.eos_token_ids:
        config["eos_token_id"] = tokenizer.eos_token_ids
    permute = {}
    if arch == "llama":
        for layer in range(config["num_hidden_layers"]):
            for kind, heads in (("q", config["num_attention_heads"]),
                                ("k", config["num_key_value_heads"])):
                for suffix in ("weight", "bias"):
                    permute[f"blk.{layer}.attn_{kind}.{suffix}"] = heads
    return ImportPlan(config, names, permute, tokenizer)


def _meta(gguf: GGUFFile, key: str, default=None, required=False):
    value = gguf.metadata.get(key)
    if value is None:
        if required:
            raise GGUFImportError(f"{gguf.path}: missing required metadata key '{key}'")
        return default
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise GGUFImportError(
                f"{gguf.path}: metadata key '{key}' holds per-layer values, which are not supported"
            )
        value = value.reshape(()).item()
    return value


def _meta_int(gguf: GGUFFile, key: str, low: int, high: int, default=None, required=False):
    """An integer metadata value, range-checked by ``bounded``."""
    value = _meta(gguf, key, default, required)
    return None if value is None else bounded(key, value, low, high)


def _meta_float(gguf: GGUFFile, key: str, default=None, required=False):
    """A positive finite float (epsilons, rope bases and factors)."""
    value = _meta(gguf, key, default, required)
    if value is None:
        return None
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number))
            or not math.isfinite(value) or value <= 0):
        raise Corrupt(f"{key} must be a positive number, got {show(value)}")
    return float(value)


def _check_tensor_types(gguf: GGUFFile) -> None:
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import _type_traits

    for info in gguf.tensors.values():
        try:
            qtype = GGMLQuantizationType(info.ggml_type)
        except ValueError:
            raise GGUFImportError(
                f"{gguf.path}: tensor '{info.name}' has unknown tensor type {info.ggml_type}"
            ) from None
        if qtype.name not in ("F32", "F16", "BF16", "F64") and qtype not in _type_traits:
            raise GGUFImportError(
                f"{gguf.path}: tensor '{info.name}' has unsupported tensor type {qtype.name}"
            )


def _map_tensor_names(gguf: GGUFFile) -> Dict[str, str]:
    names = {}
    for name in gguf.tensors:
        if name in _IGNORED_TENSORS:
            continue
        if name in _GLOBAL_NAMES:
            names[name] = _GLOBAL_NAMES[name]
            continue
        m = re.fullmatch(r"blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)", name)
        if m and m.group(2) in _IGNORED_BLOCK_TENSORS:
            continue
        if not m or m.group(2) not in _BLOCK_NAMES:
            raise GGUFImportError(
                f"{gguf.path}: unexpected tensor '{name}' for architecture '{gguf.architecture}'"
            )
        layer, kind, suffix = m.groups()
        names[name] = f"model.layers.{layer}.{_BLOCK_NAMES[kind]}.{suffix}"
    if "token_embd.weight" not in names:
        raise GGUFImportError(f"{gguf.path}: missing tensor 'token_embd.weight'")
    return names


def _build_config(gguf: GGUFFile, names: Dict[str, str]) -> dict:
    """config.json values, each range-checked and then checked against the tensors."""
    arch = gguf.architecture
    path = gguf.path

    def key(name):
        return f"{arch}.{name}"

    layers = _check_layer_count(gguf, names)
    hidden = _meta_int(gguf, key("embedding_length"), 1, _MAX_WIDTH, required=True)
    heads = _meta_int(gguf, key("attention.head_count"), 1, _MAX_HEADS, required=True)
    kv_heads = _meta_int(gguf, key("attention.head_count_kv"), 1, _MAX_HEADS, default=heads)
    if heads % kv_heads:
        raise GGUFImportError(
            f"{path}: {key('attention.head_count')} {heads} is not divisible by "
            f"{key('attention.head_count_kv')} {kv_heads}"
        )
    head_dim = _meta_int(gguf, key("attention.key_length"), 1, _MAX_HEAD_DIM)
    if head_dim is None:
        if hidden % heads:
            raise GGUFImportError(
                f"{path}: {key('embedding_length')} {hidden} is not divisible by "
                f"{key('attention.head_count')} {heads}"
            )
        head_dim = hidden // heads
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": _meta_int(gguf, key("feed_forward_length"), 1, _MAX_WIDTH,
                                       required=True),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _meta_float(gguf, key("attention.layer_norm_rms_epsilon"),
                                    required=True),
        "max_position_embeddings": _meta_int(gguf, key("context_length"), 1, _MAX_CONTEXT,
                                             required=True),
        "vocab_size": bounded("token_embd.weight rows (vocabulary size)",
                               gguf.tensors["token_embd.weight"].shape[0], 1, _MAX_VOCAB),
        "rope_theta": _meta_float(gguf, key("rope.freq_base"), 10000.0),
        "rope_traditional": False,
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
    }
    _check_shapes(gguf, config)
    _check_rope_dims(gguf, config)
    scaling = _rope_scaling(gguf, config)
    if scaling is not None:
        config["rope_scaling"] = scaling
    if arch == "llama":
        config["attention_bias"] = _llama_attention_bias(gguf, names)
        config["mlp_bias"] = False
    return config


def _check_layer_count(gguf: GGUFFile, names: Dict[str, str]) -> int:
    """block_count sizes loops and the model: it must be the blk.N layers present."""
    key = f"{gguf.architecture}.block_count"
    declared = _meta_int(gguf, key, 0, 1 << 64, required=True)
    present = sorted({int(n.split(".")[2]) for n in names.values()
                      if n.startswith("model.layers.")})
    if declared != len(present):
        raise GGUFImportError(
            f"{gguf.path}: {key} {declared} declared but {len(present)} layers present "
            "(blk.N tensors)"
        )
    if present != list(range(len(present))):
        raise GGUFImportError(
            f"{gguf.path}: blk.N layers are not numbered 0..{len(present) - 1} "
            f"(found {show(present)})"
        )
    return bounded(key, declared, 1, _MAX_LAYERS)


def _check_shapes(gguf: GGUFFile, config: dict) -> None:
    """Declared sizes must match the tensors before mlx-lm builds a model from them."""
    arch = gguf.architecture
    h, hd, f = config["hidden_size"], config["head_dim"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    q, kv = heads * hd, kv_heads * hd
    emb = f"{arch}.embedding_length={h}"
    q_why = f"{arch}.attention.head_count={heads} x head dim {hd}, {emb}"
    kv_why = f"{arch}.attention.head_count_kv={kv_heads} x head dim {hd}, {emb}"
    ffn_why = f"{arch}.feed_forward_length={f}, {emb}"
    per_layer = {
        "attn_q.weight": ((q, h), q_why), "attn_k.weight": ((kv, h), kv_why),
        "attn_v.weight": ((kv, h), kv_why), "attn_output.weight": ((h, q), q_why),
        "ffn_gate.weight": ((f, h), ffn_why), "ffn_up.weight": ((f, h), ffn_why),
        "ffn_down.weight": ((h, f), ffn_why),
    }
    expected = {"token_embd.weight": ((config["vocab_size"], h), emb)}
    for layer in range(config["num_hidden_layers"]):
        for suffix, want in per_layer.items():
            expected[f"blk.{layer}.{suffix}"] = want
    for name, (shape, why) in expected.items():
        info = gguf.tensors.get(name)
        if info is not None and tuple(info.shape) != shape:
            raise GGUFImportError(
                f"{gguf.path}: tensor '{name}' has shape {list(info.shape)}, "
                f"but the metadata ({why}) implies {list(shape)}"
            )


def _check_rope_dims(gguf: GGUFFile, config: dict) -> None:
    """mlx-lm rotates the whole head; partial rotary GGUFs would be silently wrong."""
    arch = gguf.architecture
    n_rot = _meta_int(gguf, f"{arch}.rope.dimension_count", 0, _MAX_HEAD_DIM)
    if n_rot is not None and n_rot != config["head_dim"]:
        raise GGUFImportError(
            f"{gguf.path}: unsupported partial rotary embedding "
            f"({arch}.rope.dimension_count={n_rot}, head dim {config['head_dim']})"
        )
    if arch == "qwen2" and config["head_dim"] * config["num_attention_heads"] != config["hidden_size"]:
        raise GGUFImportError(
            f"{gguf.path}: unsupported qwen2 head size {config['head_dim']} "
            "(mlx-lm's qwen2 needs hidden_size / head_count)"
        )


def _rope_scaling(gguf: GGUFFile, config: dict) -> Optional[dict]:
    arch = gguf.architecture
    kind = _meta(gguf, f"{arch}.rope.scaling.type")
    factor = _meta_float(gguf, f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return _llama3_rope_scaling(gguf, config)
    if kind in ("linear", "yarn") and factor is None:
        raise GGUFImportError(
            f"{gguf.path}: missing required metadata key '{arch}.rope.scaling.factor'"
        )
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    if kind == "yarn":
        original = _meta_int(gguf, f"{arch}.rope.scaling.original_context_length", 1,
                             _MAX_CONTEXT, config["max_position_embeddings"])
        return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise GGUFImportError(f"{gguf.path}: unsupported rope scaling type {show(kind)}")


def _llama3_rope_scaling(gguf: GGUFFile, config: dict) -> Optional[dict]:
    """Llama 3.x GGUFs carry rope scaling as a rope_freqs tensor of per-pair factors.

    llama.cpp's converter computes them from the Llama 3 formula; we recover its
    parameters (Meta's published low/high frequency factors and original context)
    and check that they reproduce the tensor exactly.
    """
    info = gguf.tensors.get("rope_freqs.weight")
    if info is None:
        return None
    if tuple(info.shape) != (config["head_dim"] // 2,):
        raise GGUFImportError(
            f"{gguf.path}: tensor 'rope_freqs.weight' has shape {list(info.shape)}, "
            f"but head dim {config['head_dim']} implies [{config['head_dim'] // 2}]"
        )
    factors = to_float32(gguf, info).reshape(-1)
    if np.allclose(factors, 1.0):
        return None
    dims, base = config["head_dim"], config["rope_theta"]
    for original in (8192, 4096, 2048, 16384, 32768):
        candidate = {"rope_type": "llama3", "factor": float(factors.max()),
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": original}
        if np.allclose(llama3_factors(candidate, dims, base), factors, rtol=1e-4):
            return candidate
    raise GGUFImportError(
        f"{gguf.path}: unsupported rope_freqs tensor (not llama3 rope scaling with known parameters)"
    )


def llama3_factors(scaling: dict, dims: int, base: float) -> np.ndarray:
    """The per-pair frequency divisors llama.cpp's converter writes for llama3 rope."""
    freqs = 1.0 / (base ** (np.arange(0, dims, 2, dtype=np.float64) / dims))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _llama_attention_bias(gguf: GGUFFile, names: Dict[str, str]) -> bool:
    present = {k for k in ("q", "k", "v", "output") if f"blk.0.attn_{k}.bias" in gguf.tensors}
    if present and present != {"q", "k", "v", "output"}:
        raise GGUFImportError(
            f"{gguf.path}: unsupported llama attention biases on {sorted(present)} only "
            "(mlx-lm's llama needs all of q, k, v, output or none)"
        )
    return bool(present)


def _check_vocab(gguf: GGUFFile, config: dict) -> None:
    """The token list must match the embedding rows (and so is bounded by them)."""
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFImportError(
            f"{gguf.path}: missing required metadata key 'tokenizer.ggml.tokens'"
        )
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise GGUFImportError(f"{gguf.path}: tokenizer.ggml.tokens is not an array of strings")
    rows = config["vocab_size"]
    if len(tokens) != rows:
        raise GGUFImportError(
            f"{gguf.path}: vocabulary size mismatch: {len(tokens)} tokens in "
            f"tokenizer.ggml.tokens but token_embd.weight has {rows} rows"
        )
    out = gguf.tensors.get("output.weight")
    if out is not None and out.shape[0] != rows:
        raise GGUFImportError(
            f"{gguf.path}: vocabulary size mismatch: output.weight has {out.shape[0]} rows, "
            f"token_embd.weight has {rows}"
        )


def _check_against_model(gguf: GGUFFile, config: dict, names: Dict[str, str]) -> None:
    """Build the (lazy, unevaluated) mlx-lm model and compare names and shapes."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))
    except (ValueError, TypeError, KeyError, AssertionError) as err:
        raise GGUFImportError(f"{gguf.path}: metadata gives an invalid model config: {err}") from err
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    if config["tie_word_embeddings"]:
        expected.pop("lm_head.weight", None)
    by_mlx = {v: k for k, v in names.items()}
    missing = sorted(set(expected) - set(by_mlx))
    if missing:
        raise GGUFImportError(
            f"{gguf.path}: missing tensor(s) for '{gguf.architecture}': "
            + ", ".join(_gguf_name(m) for m in missing[:8])
        )
    extra = sorted(set(by_mlx) - set(expected))
    if extra:
        raise GGUFImportError(
            f"{gguf.path}: unexpected tensor(s) for '{gguf.architecture}': "
            + ", ".join(by_mlx[e] for e in extra[:8])
        )
    for mlx_name, shape in expected.items():
        got = gguf.tensors[by_mlx[mlx_name]].shape
        if tuple(got) != shape:
            raise GGUFImportError(
                f"{gguf.path}: tensor '{by_mlx[mlx_name]}' has shape {list(got)}, "
                f"metadata implies {list(shape)}"
            )


def _gguf_name(mlx_name: str) -> str:
    """Best-effort GGUF name for an mlx-lm parameter, for error messages."""
    for g, m in _GLOBAL_NAMES.items():
        if m == mlx_name:
            return g
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", mlx_name)
    if m:
        for g, mm in _BLOCK_NAMES.items():
            if mm == m.group(2):
                return f"blk.{m.group(1)}.{g}.{m.group(3)}"
    return mlx_name
