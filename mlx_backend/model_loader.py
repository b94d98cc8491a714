"""Find the model LocalAI names, load it with mlx-lm, and pick the CPU fast path.

LocalAI passes `Model` (the user's name: a folder, a `.gguf` file or a hub id),
`ModelFile` (that name joined with the models directory) and `ModelPath` (the
models directory). We try them in that spirit: an existing `ModelFile`, then
`Model` as a path (absolute or under `ModelPath`), then a hub id.

On the CPU, MLX's quantized matmul is not BLAS-backed and is several times
slower than a float32 product through OpenBLAS, so quantized weights are
dequantized to float32 at load unless the `dequantize:false` option says not to.

LoRA adapters (`LoraAdapter(s)` / `LoraScale(s)`) are checked before the
weights load and merged into them after the CPU fast path: see `adapters`.
"""

import ctypes
import dataclasses
import logging
import os
import re
import time
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import BackendError, NotFound
from .options import ModelSettings

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class LoadError(BackendError):
    """A model that cannot be loaded; LoadModel reports it in its Result."""


@dataclasses.dataclass
class LoadedModel:
    name: str  # `Model` as LocalAI sent it: the identity requests are checked against
    source: str  # the folder, file or hub id actually loaded
    model: nn.Module
    tokenizer: object  # mlx_lm TokenizerWrapper
    context_length: int
    weights_bytes: int
    weight_format: str
    load_seconds: float
    settings: ModelSettings  # the LoadModel options it was loaded with
    # LoRA adapters merged into `model`: (resolved path, LoraScale), in request order
    adapters: List[Tuple[str, float]] = dataclasses.field(default_factory=list)


def resolve_source(model: str, model_file: str = "", model_path: str = "") -> str:
    """Return an existing local path, or a hub id, for what LocalAI asked to load."""
    tried = []
    candidates = [model_file]
    if model:
        candidates.append(model)
        if model_path and not os.path.isabs(model):
            candidates.append(os.path.join(model_path, model))
    for candidate in candidates:
        if not candidate:
            continue
        tried.append(candidate)
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    if model and _HUB_ID.match(model) and not model.lower().endswith(".gguf"):
        return model
    if not tried:
        raise NotFound("no model given: set Model (a folder, a .gguf file or a hub id)")
    raise NotFound(f"model not found: tried {', '.join(repr(t) for t in tried)}")


def _model_folder(source: str, settings: ModelSettings) -> str:
    """GGUF files are imported to an MLX folder (cached); folders pass through."""
    if os.path.isfile(source):
        from .gguf import GGUFImportError, import_gguf, is_gguf

        if not is_gguf(source):
            raise LoadError(f"{source}: not a GGUF file (wrong magic) and not a model folder")

        def progress(done: int, total: int):
            if total >= 50 and done % max(total // 10, 1) == 0:
                log.info("importing %s: %d/%d tensors", os.path.basename(source), done, total)

        try:
            return str(import_gguf(source, settings.gguf_cache_dir, progress=progress,
                                   requant_bits=settings.gguf_requant_bits,
                                   requant_group_size=settings.gguf_requant_group_size))
        except GGUFImportError as err:
            raise LoadError(str(err)) from None
    if os.path.isdir(source) and not os.path.exists(os.path.join(source, "config.json")):
        raise LoadError(f"{source}: folder has no config.json; is it an MLX model folder?")
    return source


def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def _mapped(pattern: str, exclude: str = "") -> Optional[str]:
    """The first file mapped into this process whose path matches `pattern`."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if re.search(pattern, path) and not (exclude and exclude in path):
                    return path
    except OSError:
        pass
    return None


def blas_library() -> Optional[str]:
    """The optimized BLAS mapped into this process, if any (CPU fast path).
    numpy's private OpenBLAS does not serve MLX's BLAS calls."""
    return _mapped(r"openblas|libmkl|libblis", exclude="scipy_openblas")


def gemv_forwarder() -> Optional[str]:
    """The one-row forwarder run.sh preloads before OpenBLAS (mlx_backend/blas/)."""
    return _mapped(r"/mlx-backend/gemv-[0-9a-f]+\.so$")


def small_gemm_threads() -> int:
    """How many threads mlx_backend/blas/small_gemm.c (preloaded by run.sh
    before OpenBLAS) runs 2-32 row products with; 0 when it is absent or
    takes none on this CPU."""
    try:
        return ctypes.CDLL(None).small_gemm_threads()
    except AttributeError:
        return 0


def blas_forwarding() -> str:
    """What the preloaded forwarders take from OpenBLAS, for logs."""
    taken = []
    threads = small_gemm_threads()
    if threads:
        taken.append(f"2-32 row products by small_gemm.c, {threads} threads")
    if gemv_forwarder():
        taken.append("one-row products as gemv")
    return f" ({'; '.join(taken)})" if taken else ""


def _apply_cpu_fast_path(model: nn.Module, settings: ModelSettings) -> str:
    """Dequantize and widen to float32 on the CPU; describe the weight format."""
    from mlx_lm.utils import dequantize_model

    quantized_layers = [m for _, m in model.named_modules()
                        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    quantized = bool(quantized_layers)
    keep = settings.dequantize is False or (settings.dequantize is None and not on_cpu())
    if quantized and keep:
        if on_cpu():
            log.warning("keeping quantized weights on the CPU (dequantize:false): "
                        "MLX's CPU quantized kernels are several times slower")
        return "quantized"
    if quantized:
        if on_cpu():  # float32 scales make the dequantized weights float32 in one pass
            for layer in quantized_layers:
                layer.scales = layer.scales.astype(mx.float32)
                if getattr(layer, "biases", None) is not None:
                    layer.biases = layer.biases.astype(mx.float32)
        dequantize_model(model)
    if on_cpu():
        dtypes = {v.dtype for _, v in tree_flatten(model.parameters())}
        if dtypes - {mx.float32}:
            model.set_dtype(mx.float32)
        return "float32 (dequantized)" if quantized else "float32"
    return "dequantized" if quantized else str(next(iter(
        {v.dtype for _, v in tree_flatten(model.parameters())})))


def _context_length(config: dict, tokenizer, settings: ModelSettings, requested: int) -> int:
    if settings.context_size:
        return settings.context_size
    if requested and requested > 0:
        return requested
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions"):
        if config.get(key):
            return int(config[key])
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 10**7 else 4096


def load_model(request, settings: ModelSettings, prepare=None, warm=True) -> LoadedModel:
    """Resolve, load and prepare a model for a `request.LoadRequest`, with its
    LoRA adapters merged in; raises NotFound or LoadError. `prepare(model)`
    runs before the weights are read (distributed mode shards there, so a
    rank never reads the layers it drops). `warm` builds MLX's CPU kernels
    before returning (warm_up.py), never for a prepared model: its ranks must
    run every forward pass together."""
    import mlx_lm

    from . import adapters as lora

    name, context_size = request.model, request.context_size
    started = time.perf_counter()
    source = resolve_source(name, request.model_file, request.model_path)
    adapters = lora.check(request, source)  # a bad adapter fails before the weights load
    folder = _model_folder(source, settings)
    try:
        model, tokenizer, config = mlx_lm.load(
            folder, return_config=True, trust_remote_code=settings.trust_remote_code)
    except Exception as err:  # mlx-lm raises many kinds; all mean "cannot load"
        raise LoadError(f"{source}: cannot load model: {type(err).__name__}: {err}") from err
    weight_format = _apply_cpu_fast_path(model, settings)
    adapters_line = lora.apply(model, config, adapters) if adapters else ""
    compiled_on_cpu = prepare is None and on_cpu() and settings.compile_decode
    if prepare is not None:
        prepare(model)
    elif compiled_on_cpu and weight_format.startswith("float32"):
        from .cpu_blocks import note_prompt_lengths, speed_up_blocks, use_fast_logsumexp
        use_fast_logsumexp()
        note_prompt_lengths()
        fast = speed_up_blocks(model)
        if fast:
            weight_format += f", {fast} blocks on the CPU fast path"
    mx.eval(model.parameters())
    if warm and compiled_on_cpu:
        from .warm_up import warm_up
        seconds = warm_up(model, len(tokenizer))
        if seconds is not None:
            log.info("CPU kernels warmed up in %.2fs", seconds)
    weights_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    loaded = LoadedModel(
        name=name or source,
        source=source,
        model=model,
        tokenizer=tokenizer,
        context_length=_context_length(config, tokenizer, settings, context_size),
        weights_bytes=weights_bytes,
        weight_format=weight_format,
        load_seconds=time.perf_counter() - started,
        settings=settings,
        adapters=[(a.path, a.scale) for a in adapters],
    )
    device = "cpu" if on_cpu() else "gpu"
    blas = blas_library() if on_cpu() else None
    log.info("loaded %s on %s: weights %s (%.1f MB), context %d, %.2fs", source, device,
             weight_format, weights_bytes / 2**20, loaded.context_length, loaded.load_seconds)
    if adapters:
        log.info("LoRA adapters: %s", adapters_line)
    if on_cpu():
        if blas:
            log.info("CPU fast path: BLAS %s%s", blas, blas_forwarding())
        else:
            log.warning("CPU fast path unavailable: no optimized BLAS loaded (install "
                        "libopenblas0-pthread and start through run.sh)")
    return loaded
