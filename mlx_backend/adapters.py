"""LoRA adapters (LocalAI's LoraAdapter(s) and LoraScale(s)), merged into the served model.

Two formats are accepted, each given as a path (relative paths are resolved
against `ModelPath`, as LocalAI does):

- an mlx-lm adapter folder, as `mlx_lm.lora` writes it: `adapter_config.json`
  (fine_tune_type "lora", num_layers, lora_parameters {rank, scale, dropout,
  keys}) and `adapters.safetensors` (`<module>.lora_a`, `<module>.lora_b`).
  mlx-lm's own LoRA layers are put on the model (`linear_to_lora_layers`)
  and the tensors loaded with `load_adapters`' checks: each must name an
  adapted layer of this model and have its shape.
- a llama.cpp GGUF LoRA file (`general.type = adapter`, `adapter.type =
  lora`, tensors `<base tensor>.lora_a` / `.lora_b`, `adapter.lora.alpha`),
  mapped to mlx-lm names the way the GGUF import maps base tensors; for llama
  the rows of attn_q / attn_k `lora_b` get the same rotary un-interleave as
  the imported base weights.

Every adapter contributes `user_scale * adapter_scale * (B^T A^T)` to a
layer's weight (`adapter_scale` is mlx-lm's LoRA `scale`, or `alpha / rank`
for a GGUF LoRA, as llama.cpp computes it). Float weights get the sum of the
deltas added once, computed as mlx-lm's `LoRALinear.fuse` computes one
delta, so the served model is a plain model: batching, prompt caching and
every sampling control work unchanged and cost nothing extra per token.
Quantized weights (kept on a GPU, or with `dequantize:false`) stay
quantized: re-quantizing W + delta would round most of a LoRA delta away,
so such a layer becomes mlx-lm's LoRA layer around the quantized one, with
the adapters' factors stacked along the rank (one extra rank-r product per
layer and token). A scale of 0 leaves the model untouched.

`check(request)` does every check that needs no model in memory (paths,
formats, pairing, ranks, and shapes against the base's file headers), so a
bad adapter can fail LoadModel before the current model is unloaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import NotFound
from .model_loader import LoadError

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
_MAX_HEADER = 100 << 20  # a safetensors JSON header; real ones are kilobytes
_FLOAT_DTYPES = ("F32", "F16", "BF16")
# A GGUF LoRA's architecture -> the mlx-lm model types it may be applied to.
_GGUF_ARCHES = {"llama": ("llama", "mistral"), "qwen2": ("qwen2",), "qwen3": ("qwen3",)}


@dataclasses.dataclass
class Adapter:
    requested: str  # as LocalAI sent it
    path: str  # resolved, absolute: the folder (mlx) or the file (gguf)
    scale: float  # LoraScale: multiplies the adapter's contribution
    kind: str  # "mlx" or "gguf"
    config: dict  # adapter_config.json, or the GGUF LoRA's metadata that matters
    tensors: Dict[str, Tuple[str, Tuple[int, ...]]]  # name -> (dtype, shape), from the header

    @property
    def label(self) -> str:
        return f"LoRA adapter '{self.requested}' ({self.path})"

    def error(self, what: str) -> LoadError:
        return LoadError(f"{self.label}: {what}")

    @property
    def rank(self) -> Optional[int]:
        if self.kind == "mlx":
            return self.config["lora_parameters"]["rank"]
        ranks = {shape[0] for name, (_, shape) in self.tensors.items() if name.endswith(".lora_a")}
        return ranks.pop() if len(ranks) == 1 else None


# ---- resolving and checking without the model ----------------------------------------------


def check(request, source: Optional[str] = None) -> List[Adapter]:
    """Resolve and check `request.lora_adapters` (a `request.LoadRequest`) without
    loading any weights; raises NotFound or LoadError naming the adapter.

    Cheap (file headers only), so the engine can call it before it unloads the
    current model. When the base model can be found (a local folder or GGUF
    file), adapted layers are checked against its tensor shapes too."""
    paths = list(getattr(request, "lora_adapters", None) or [])
    if not paths:
        return []
    scales = list(getattr(request, "lora_scales", None) or [])
    scales += [1.0] * (len(paths) - len(scales))
    adapters = [_open(p, s, request.model_path) for p, s in zip(paths, scales)]
    base = _base_shapes(request, source)
    for adapter in adapters:
        _check_against_base(adapter, base)
    return adapters


def resolve_path(path: str, model_path: str = "") -> str:
    """An adapter path as LocalAI means it: absolute, or relative to ModelPath."""
    path = os.path.expanduser(path)
    if not os.path.isabs(path) and model_path:
        path = os.path.join(model_path, path)
    return os.path.abspath(path)


def _open(requested: str, scale: float, model_path: str) -> Adapter:
    if not requested or not requested.strip():
        raise LoadError("LoRA adapter path is empty")
    if not math.isfinite(scale):
        raise LoadError(f"LoRA adapter '{requested}': scale {scale} is not a finite number")
    path = resolve_path(requested, model_path)
    if not os.path.exists(path):
        where = f" (relative paths are resolved against ModelPath {model_path!r})" \
            if not os.path.isabs(os.path.expanduser(requested)) and model_path else ""
        raise NotFound(f"LoRA adapter '{requested}' not found: {path} does not exist{where}")
    if os.path.isfile(path):
        from .gguf import is_gguf

        try:
            gguf = is_gguf(path)
        except OSError as err:
            raise LoadError(f"LoRA adapter '{requested}' ({path}): cannot read: {err}") from None
        if gguf:
            return _open_gguf(requested, path, scale)
        folder = os.path.dirname(path)
        if os.path.basename(path) == WEIGHTS_NAME \
                and os.path.exists(os.path.join(folder, CONFIG_NAME)):
            path = folder  # the weights file of an mlx-lm adapter folder
        else:
            raise LoadError(
                f"LoRA adapter '{requested}' ({path}): not a GGUF LoRA file (wrong magic) and "
                f"not an mlx-lm adapter folder ({CONFIG_NAME} + {WEIGHTS_NAME})")
    return _open_folder(requested, path, scale)


def _open_folder(requested: str, path: str, scale: float) -> Adapter:
    label = f"LoRA adapter '{requested}' ({path})"
    config_path = os.path.join(path, CONFIG_NAME)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    peft = os.path.exists(os.path.join(path, "adapter_model.safetensors")) or \
        os.path.exists(os.path.join(path, "adapter_model.bin"))
    peft_hint = ("a Hugging Face PEFT adapter is not supported as it is: convert it with "
                 "llama.cpp's convert_lora_to_gguf.py and pass the GGUF LoRA file")
    if not os.path.isfile(config_path):
        raise LoadError(f"{label}: {peft_hint}" if peft else
                        f"{label}: no {CONFIG_NAME} (an mlx-lm adapter folder holds "
                        f"{CONFIG_NAME} and {WEIGHTS_NAME}, as mlx_lm.lora writes them)")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise LoadError(f"{label}: cannot read {CONFIG_NAME}: {err}") from None
    if not isinstance(config, dict):
        raise LoadError(f"{label}: {CONFIG_NAME} is not a JSON object")
    if "peft_type" in config and "lora_parameters" not in config:
        raise LoadError(f"{label}: {peft_hint}")
    kind = config.get("fine_tune_type", "lora")
    if kind == "dora":
        raise LoadError(f"{label}: DoRA adapters cannot be scaled or combined; fuse it into "
                        "the model with mlx_lm.fuse and load the fused folder")
    if kind == "full":
        raise LoadError(f"{label}: a full fine-tune is a set of model weights, not an adapter; "
                        "load it as a model")
    if kind != "lora":
        raise LoadError(f"{label}: unknown fine_tune_type {kind!r} in {CONFIG_NAME}")
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise LoadError(f"{label}: {CONFIG_NAME} has no lora_parameters object")
    rank, lora_scale = params.get("rank"), params.get("scale")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoadError(f"{label}: lora_parameters.rank must be a positive integer, "
                        f"got {rank!r}")
    if "scale" not in params and "alpha" in params:
        raise LoadError(f"{label}: lora_parameters has 'alpha' but mlx-lm adapters give "
                        "'scale' (alpha / rank)")
    if isinstance(lora_scale, bool) or not isinstance(lora_scale, (int, float)) \
            or not math.isfinite(lora_scale):
        raise LoadError(f"{label}: lora_parameters.scale must be a number, got {lora_scale!r}")
    params.setdefault("dropout", 0.0)
    num_layers = config.get("num_layers")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise LoadError(f"{label}: num_layers must be an integer, got {num_layers!r}")
    keys = params.get("keys")
    if keys is not None and (not isinstance(keys, list)
                             or not all(isinstance(k, str) for k in keys)):
        raise LoadError(f"{label}: lora_parameters.keys must be a list of layer names")
    if not os.path.isfile(weights_path):
        raise LoadError(f"{label}: no {WEIGHTS_NAME} beside {CONFIG_NAME}")
    try:
        tensors = _safetensors_header(weights_path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LoadError(f"{label}: {WEIGHTS_NAME} is unreadable: {err}") from None
    adapter = Adapter(requested, path, scale, "mlx", config, tensors)
    _check_mlx_tensors(adapter)
    return adapter


def _safetensors_header(path: str) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """Names, dtypes and shapes from a safetensors header, checked against the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("not a safetensors file (too short)")
        n = int.from_bytes(raw, "little")
        if n < 2 or n > min(size - 8, _MAX_HEADER):
            raise ValueError("not a safetensors file (bad header length)")
        header = json.loads(f.read(n).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (header is not an object)")
    data = size - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        if not 0 <= begin <= end <= data:
            raise ValueError(f"tensor {name!r} runs past the end of the file (truncated?)")
        out[name] = (str(info["dtype"]), shape)
    return out


def _check_mlx_tensors(adapter: Adapter) -> None:
    """Pairs, float types and ranks, from the header alone."""
    rank = adapter.config["lora_parameters"]["rank"]
    modules: Dict[str, Dict[str, tuple]] = {}
    for name, (dtype, shape) in adapter.tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b") or not module:
            raise adapter.error(f"{WEIGHTS_NAME} holds '{name}', which is not a LoRA tensor "
                                "(<layer>.lora_a / <layer>.lora_b)")
        if dtype not in _FLOAT_DTYPES:
            raise adapter.error(f"tensor '{name}' has type {dtype}; LoRA tensors are float")
        modules.setdefault(module, {})[leaf] = shape
    if not modules:
        raise adapter.error(f"{WEIGHTS_NAME} holds no LoRA tensors")
    for module, pair in sorted(modules.items()):
        if len(pair) != 2:
            missing = "lora_b" if "lora_a" in pair else "lora_a"
            raise adapter.error(f"'{module}' has no {missing} tensor")
        a, b = pair["lora_a"], pair["lora_b"]
        if len(a) != len(b) or len(a) not in (2, 3):
            raise adapter.error(f"'{module}': lora_a {list(a)} and lora_b {list(b)} are not "
                                "LoRA factors")
        a_rank, b_rank = (a[1], b[0]) if len(a) == 2 else (a[1], b[2])
        if a_rank != rank or b_rank != rank:
            raise adapter.error(f"'{module}': lora_a {list(a)} / lora_b {list(b)} do not have "
                                f"the rank {rank} that {CONFIG_NAME} gives")


def _open_gguf(requested: str, path: str, scale: float) -> Adapter:
    from .gguf import GGUFImportError, read_gguf
    from .gguf.architecture import _check_tensor_types

    label = f"LoRA adapter '{requested}' ({path})"
    try:
        gguf = read_gguf(path)
        _check_tensor_types(gguf)
    except GGUFImportError as err:
        raise LoadError(f"{label}: {err}") from None
    meta = gguf.metadata
    if meta.get("general.type") != "adapter":
        raise LoadError(f"{label}: a GGUF file but not an adapter (general.type "
                        f"{meta.get('general.type')!r}, expected 'adapter'): is it a model?")
    if meta.get("adapter.type") != "lora":
        raise LoadError(f"{label}: adapter.type {meta.get('adapter.type')!r} is not supported "
                        "(only 'lora')")
    if "adapter.alora.invocation_tokens" in meta:
        raise LoadError(f"{label}: activated LoRA (aLoRA) adapters are not supported")
    alpha = meta.get("adapter.lora.alpha", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise LoadError(f"{label}: adapter.lora.alpha must be a number, got {alpha!r}")
    arch = gguf.architecture
    if arch not in _GGUF_ARCHES:
        raise LoadError(f"{label}: architecture {arch!r} is not supported for GGUF LoRA "
                        f"(supported: {', '.join(_GGUF_ARCHES)})")
    tensors = {name: (_gguf_type(info.ggml_type), tuple(info.shape))
               for name, info in gguf.tensors.items()}
    adapter = Adapter(requested, path, scale, "gguf",
                      {"architecture": arch, "alpha": float(alpha)}, tensors)
    _check_gguf_tensors(adapter)
    return adapter


def _gguf_type(ggml_type: int) -> str:
    from gguf.constants import GGMLQuantizationType

    return GGMLQuantizationType(ggml_type).name


def _gguf_pairs(adapter: Adapter) -> Dict[str, Dict[str, Tuple[int, ...]]]:
    """Base tensor name -> {'lora_a': shape, 'lora_b': shape}; norm vectors are
    skipped, as llama.cpp skips them."""
    pairs: Dict[str, Dict[str, tuple]] = {}
    for name, (_, shape) in adapter.tensors.items():
        base, _, leaf = name.rpartition(".")
        if leaf in ("lora_a", "lora_b") and base:
            pairs.setdefault(base, {})[leaf] = shape
        elif name.endswith("_norm.weight"):
            continue
        else:
            raise adapter.error(f"tensor '{name}' has an unexpected suffix "
                                "(expected .lora_a / .lora_b)")
    return pairs


def _gguf_to_mlx(base: str) -> Tuple[str, Optional[str]]:
    """A GGUF base tensor name -> (mlx-lm module name, 'q'/'k' for rotary rows)."""
    from .gguf.architecture import _BLOCK_NAMES, _GLOBAL_NAMES

    if base in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[base].rsplit(".", 1)[0], None
    m = re.fullmatch(r"blk\.(\d+)\.([a-z_0-9]+)\.weight", base)
    if m and m.group(2) in _BLOCK_NAMES:
        kind = {"attn_q": "q", "attn_k": "k"}.get(m.group(2))
        return f"model.layers.{int(m.group(1))}.{_BLOCK_NAMES[m.group(2)]}", kind
    raise KeyError(base)


_GGUF_MATRICES = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}


def _check_gguf_tensors(adapter: Adapter) -> None:
    pairs = _gguf_pairs(adapter)
    if not pairs:
        raise adapter.error("holds no LoRA tensors (<tensor>.lora_a / .lora_b)")
    for base, pair in sorted(pairs.items()):
        if len(pair) != 2:
            raise adapter.error(f"LoRA tensor pair for '{base}' is missing one component")
        if base == "token_embd.weight":
            raise adapter.error("a LoRA on token_embd.weight is not supported")
        m = re.fullmatch(r"blk\.\d+\.([a-z_0-9]+)\.weight", base)
        if base != "output.weight" and not (m and m.group(1) in _GGUF_MATRICES):
            raise adapter.error(f"LoRA tensor '{base}' names no weight matrix of a "
                                f"{adapter.config['architecture']} model")
        a, b = pair["lora_a"], pair["lora_b"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise adapter.error(f"'{base}': lora_a {list(a)} / lora_b {list(b)} are not LoRA "
                                "factors (lora_a is [rank, in], lora_b [out, rank])")


# ---- the base model's shapes, from file headers --------------------------------------------


@dataclasses.dataclass
class _Base:
    model_type: str
    shapes: Dict[str, Tuple[int, ...]]  # mlx-lm parameter name -> logical shape
    quantized: Dict[str, Optional[int]]  # module -> bits (None: unknown) of quantized modules
    _layer_counts: Dict[str, int] = dataclasses.field(default_factory=dict, repr=False)

    def layer_count(self, prefix: str) -> int:
        """1 + the highest N of the `<prefix>.N.` tensors (0: none)."""
        counts = self._layer_counts
        if prefix not in counts:
            head = prefix + "."
            found = [n[len(head):].split(".", 1)[0] for n in self.shapes if n.startswith(head)]
            counts[prefix] = max((int(i) + 1 for i in found if i.isdigit()), default=0)
        return counts[prefix]


def _base_shapes(request, source: Optional[str]) -> Optional[_Base]:
    """What the base's headers say, or None when the base cannot be read cheaply
    (a hub id, a missing or broken model: load_model reports those)."""
    from .model_loader import resolve_source

    try:
        source = source or resolve_source(request.model, request.model_file, request.model_path)
    except Exception:  # the model itself is missing: load_model says so
        return None
    try:
        if os.path.isfile(source):
            return _gguf_base(source)
        if os.path.isdir(source):
            return _folder_base(source)
    except Exception as err:  # a broken base is load_model's to report
        log.debug("no adapter pre-check against %s: %s", source, err)
    return None


def _gguf_base(path: str) -> Optional[_Base]:
    from .gguf import is_gguf, read_gguf
    from .gguf.architecture import _map_tensor_names

    if not is_gguf(path):
        return None
    gguf = read_gguf(path)
    names = _map_tensor_names(gguf)
    shapes = {mlx: tuple(gguf.tensors[g].shape) for g, mlx in names.items()}
    return _Base(gguf.architecture, shapes, {})


def _folder_base(folder: str) -> Optional[_Base]:
    import glob

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    quant = config.get("quantization") or {}
    headers: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "model*.safetensors"))):
        headers.update(_safetensors_header(path))
    if not headers:
        return None
    shapes, quantized = {}, {}
    for name, (_, shape) in headers.items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and f"{module}.scales" in headers and len(shape) >= 2:
            per_module = quant.get(module)
            bits = (per_module if isinstance(per_module, dict) else quant).get("bits")
            quantized[module] = bits if isinstance(bits, int) and bits > 0 else None
            if quantized[module]:
                shape = (*shape[:-1], shape[-1] * 32 // quantized[module])
            else:
                continue  # its input size is unknown: not checked here
        shapes[name] = tuple(shape)
    return _Base(str(config.get("model_type", "")), shapes, quantized)


def _check_against_base(adapter: Adapter, base: Optional[_Base]) -> None:
    if base is None:
        return
    if adapter.kind == "gguf":
        arch = adapter.config["architecture"]
        if base.model_type and base.model_type not in _GGUF_ARCHES[arch]:
            raise adapter.error(f"a LoRA for a '{arch}' model cannot apply to this "
                                f"'{base.model_type}' model: is it for another base?")
        pairs = _gguf_pairs(adapter)
        for gname, pair in sorted(pairs.items()):
            module, _ = _gguf_to_mlx(gname)
            a, b = pair["lora_a"], pair["lora_b"]  # (rank, in), (out, rank)
            _check_module(adapter, base, module, gname, out=b[0], inp=a[1])
        return
    for name, (_, a) in sorted(adapter.tensors.items()):
        if not name.endswith(".lora_a") or len(a) != 2:
            continue
        module = name[: -len(".lora_a")]
        b = adapter.tensors[f"{module}.lora_b"][1]
        _check_module(adapter, base, module, module, out=b[1], inp=a[0], embedding_ok=True)


def _check_module(adapter, base: _Base, module: str, shown: str, out: int, inp: int,
                  embedding_ok: bool = False) -> None:
    shape = base.shapes.get(f"{module}.weight")
    if shape is None:
        if module in base.quantized:
            return  # quantized with unknown bits: load_adapters checks it
        m = re.fullmatch(r"(.*\blayers)\.(\d+)\..*", module)
        count = base.layer_count(m.group(1)) if m else 0
        if count and int(m.group(2)) >= count:
            raise adapter.error(f"'{shown}' is for layer {m.group(2)} but the base model has "
                                f"{count} layers: is it for another base?")
        if adapter.kind == "gguf" and not module.startswith("model.layers."):
            raise adapter.error(f"'{shown}' has no matching tensor in the base model "
                                "(hint: a tied output? another base?)")
        return  # other names are mlx-lm's to map (sanitize); load_adapters checks them
    if len(shape) != 2:
        return
    rows, cols = shape
    if (rows, cols) == (out, inp) or (embedding_ok and (rows, cols) == (inp, out)):
        return
    raise adapter.error(f"'{shown}' does not fit the base model: the base weight is "
                        f"{rows}x{cols} (out x in), the adapter is for {out}x{inp}: "
                        "is it for another base?")


# ---- applying to a loaded model -------------------------------------------------------------


@dataclasses.dataclass
class _Factors:
    kind: str  # "linear", "switch" or "embedding" (mlx-lm's LoRA layer layouts)
    a: object  # mx.array: linear (in, r), switch (E, r, in), embedding (num, r)
    b: object  # mx.array: linear (r, out), switch (E, out, r), embedding (r, dims)
    scale: float  # user scale x adapter scale


def apply(model, config: dict, adapters: Sequence[Adapter]) -> str:
    """Merge `adapters` into `model` in place; returns a one-line description.
    Raises LoadError naming the adapter when one does not fit the model."""
    per_module: Dict[str, List[_Factors]] = {}
    described = []
    for adapter in adapters:
        if adapter.kind == "mlx":
            factors = _mlx_factors(model, adapter)
        else:
            factors = _gguf_factors(model, config, adapter)
        what = (f"{adapter.path} x{adapter.scale:g} ({adapter.kind} lora, rank "
                f"{adapter.rank or '?'}, {len(factors)} layers)")
        if adapter.scale == 0:
            described.append(what + " skipped: scale 0")
            continue
        described.append(what)
        for module, f in factors.items():
            per_module.setdefault(module, []).append(f)
    fused, wrapped = _merge(model, per_module)
    how = []
    if fused:
        how.append(f"fused into {fused} layers")
    if wrapped:
        how.append(f"{wrapped} quantized layers kept quantized with unfused LoRA")
    return "; ".join(described) + (f" -> {', '.join(how)}" if how else "")


def _mlx_factors(model, adapter: Adapter) -> Dict[str, _Factors]:
    """mlx-lm's own LoRA layers on this model (`linear_to_lora_layers`, then the
    checks and loading of `load_adapters`); their factors are taken and the base
    layers put back."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear
    from mlx_lm.tuner.utils import linear_to_lora_layers

    kinds = ((LoRALinear, "linear", "linear"), (LoRASwitchLinear, "switch", "linear"),
             (LoRAEmbedding, "embedding", "embedding"))
    try:
        linear_to_lora_layers(model, adapter.config["num_layers"],
                              adapter.config["lora_parameters"])
    except Exception as err:  # a layer kind mlx-lm cannot adapt, a model without .layers
        raise adapter.error(f"cannot add LoRA layers to this model: "
                            f"{type(err).__name__}: {err}") from None
    try:
        weights = mx.load(os.path.join(adapter.path, WEIGHTS_NAME))
    except Exception as err:
        raise adapter.error(f"cannot read {WEIGHTS_NAME}: {err}") from None
    params = {name: p for name, p in tree_flatten(model.parameters())
              if name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
    misfits = []
    for name, w in sorted(weights.items()):  # load_adapters' checks
        if name not in params:
            misfits.append(f"'{name}' is not a LoRA layer of this model")
        elif w.shape != params[name].shape:
            misfits.append(f"'{name}' has shape {list(w.shape)}, this model's LoRA layer "
                           f"needs {list(params[name].shape)}")
    if misfits:
        more = f" (and {len(misfits) - 4} more)" if len(misfits) > 4 else ""
        raise adapter.error("does not fit this model: " + "; ".join(misfits[:4]) + more
                            + ": is it for another base, or do num_layers / keys in "
                            f"{CONFIG_NAME} differ from its tensors?")
    model.load_weights(list(weights.items()), strict=False)
    factors: Dict[str, _Factors] = {}
    restore = []
    for name, module in model.named_modules():
        for cls, kind, attr in kinds:
            if type(module) is cls:
                restore.append((name, getattr(module, attr)))
                if f"{name}.lora_a" in weights:  # _check_mlx_tensors: both or neither
                    factors[name] = _Factors(kind, module.lora_a, module.lora_b,
                                             adapter.scale * module.scale)
                # neither: mlx-lm's zero lora_b, so the layer is unchanged
                break
        else:
            if hasattr(module, "lora_a") and hasattr(module, "fuse"):
                raise adapter.error(f"layer '{name}' became a {type(module).__name__}, "
                                    "which cannot be merged")
    model.update_modules(tree_unflatten(restore))
    if not factors:
        raise adapter.error("changes no layer of this model")
    return factors


def _gguf_factors(model, config: dict, adapter: Adapter) -> Dict[str, _Factors]:
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from .gguf import read_gguf
    from .gguf.repack import Converted, to_float32, unpermute_rows

    arch = adapter.config["architecture"]
    model_type = config.get("model_type", "")
    if model_type not in _GGUF_ARCHES[arch]:
        raise adapter.error(f"a LoRA for a '{arch}' model cannot apply to this "
                            f"'{model_type}' model: is it for another base?")
    heads = {"q": config.get("num_attention_heads")}
    heads["k"] = config.get("num_key_value_heads") or heads["q"]
    modules = dict(model.named_modules())
    gguf = read_gguf(adapter.path)
    alpha = adapter.config["alpha"]
    factors = {}
    for gname, _ in sorted(_gguf_pairs(adapter).items()):
        name, rotary = _gguf_to_mlx(gname)
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            raise adapter.error(f"'{gname}' has no matching layer '{name}' in this model "
                                "(hint: a tied output? another base?)")
        out, inp = _linear_dims(module)
        a = to_float32(gguf, gguf.tensors[f"{gname}.lora_a"])  # (rank, in)
        b = to_float32(gguf, gguf.tensors[f"{gname}.lora_b"])  # (out, rank)
        if a.shape[1] != inp or b.shape[0] != out:
            raise adapter.error(f"'{gname}' does not fit this model: the layer is {out}x{inp} "
                                f"(out x in), the adapter is for {b.shape[0]}x{a.shape[1]}: "
                                "is it for another base?")
        if arch == "llama" and rotary:  # the base's rows were un-interleaved at import
            if not heads[rotary] or out % (2 * heads[rotary]):
                raise adapter.error(f"'{gname}': {out} rows do not split into "
                                    f"{heads[rotary]} rotary heads")
            b = unpermute_rows(Converted({"weight": b}), heads[rotary]).arrays["weight"]
        rank = b.shape[1]
        lora_scale = alpha / rank if alpha else 1.0  # llama.cpp's get_scale
        factors[name] = _Factors("linear", mx.array(np.ascontiguousarray(a.T)),
                                 mx.array(np.ascontiguousarray(b.T)),
                                 adapter.scale * lora_scale)
    return factors


def _linear_dims(module) -> Tuple[int, int]:
    import mlx.nn as nn

    out, inp = module.weight.shape
    if isinstance(module, nn.QuantizedLinear):
        inp = inp * 32 // module.bits
    return out, inp


def _delta(f: _Factors):
    """One adapter's weight delta, computed as mlx-lm's LoRA layers' fuse() does."""
    if f.kind == "linear":
        return (f.scale * f.b.T) @ f.a.T
    if f.kind == "switch":
        return (f.scale * f.b) @ f.a.reshape(f.a.shape[0], -1, f.a.shape[-1])
    return (f.scale * f.a) @ f.b


def _merge(model, per_module: Dict[str, List[_Factors]]) -> Tuple[int, int]:
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    modules = dict(model.named_modules())
    replaced = []
    fused = wrapped = 0
    for name, factors in per_module.items():
        module = modules[name]
        if _is_quantized(module):
            replaced.append((name, _wrap(module, factors)))
            mx.eval(replaced[-1][1].parameters())
            wrapped += 1
            continue
        weight = module.weight
        if len(factors) == 1:
            total = _delta(factors[0])
        else:
            total = sum(_delta(f).astype(mx.float32) for f in factors)
        module.weight = weight + total.astype(weight.dtype)
        mx.eval(module.weight)
        fused += 1
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    return fused, wrapped


def _is_quantized(module) -> bool:
    return "scales" in module


def _wrap(module, factors: List[_Factors]):
    """mlx-lm's LoRA layer around a quantized one; several adapters' factors are
    stacked along the rank, each one's scale folded into its B."""
    import mlx.core as mx
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    kind = factors[0].kind
    cls = {"linear": LoRALinear, "switch": LoRASwitchLinear, "embedding": LoRAEmbedding}[kind]
    if len(factors) == 1:
        a, b, scale = factors[0].a, factors[0].b, factors[0].scale
    else:
        a_axis, b_axis = {"linear": (1, 0), "switch": (1, 2), "embedding": (1, 0)}[kind]
        a = mx.concatenate([f.a for f in factors], axis=a_axis)
        b = mx.concatenate([f.scale * f.b for f in factors], axis=b_axis)
        scale = 1.0
    rank = a.shape[1]
    wrapper = cls.from_base(module, r=rank, dropout=0.0, scale=scale)
    wrapper.lora_a, wrapper.lora_b = a, b
    wrapper.eval()
    return wrapper


# ---- identity --------------------------------------------------------------------------------


def stamp(path: str) -> list:
    """Size and mtime of the files an adapter is read from (for prompt cache identity)."""
    files = [os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)] \
        if os.path.isdir(path) else [path]
    out = []
    for f in files:
        try:
            st = os.stat(f)
            out.append([os.path.basename(f), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([os.path.basename(f), None, None])
    return out
