"""Splitting an already-loaded mlx-lm model across an `mx.distributed` group.

Two ways, both mlx-lm's own where the model has them:

- tensor: every rank holds every layer but a slice of each attention and MLP
  projection (`model.shard(group)`); the partial results are summed across
  ranks twice per layer. Needs the head counts to divide by the group size.
- pipeline: every rank holds a contiguous block of whole layers and passes the
  hidden state on (`model.model.pipeline(group)`, mlx-lm's PipelineMixin). For
  inner models without it (llama in mlx-lm 0.32) `PipelineStage` does the
  same, following PipelineMixin's convention exactly: rank size-1 runs the
  first layers, rank 0 the last, and the result is all-gathered so every rank
  samples the same token.

Call `shard_model` after loading and before the weights are evaluated, so a
rank never reads the weights of the layers it drops. Every rank must then run
the same model calls in the same order: each call is a collective.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from ..errors import InvalidArgument

PARALLEL = ("tensor", "pipeline")

# Inner models whose forward is exactly embed -> layers(h, mask, cache) -> norm,
# so that `PipelineStage` computes what they compute. Others (gemma scales the
# embeddings, for one) would give wrong tokens silently, so they are refused.
PLAIN_INNER_MODELS = ("mlx_lm.models.llama.LlamaModel", "mlx_lm.models.qwen3.Qwen3Model")


def choose_parallel(model, group_size: int, requested: str | None) -> str:
    """'tensor' or 'pipeline' for `model` on `group_size` ranks.

    `requested` None picks tensor when it works (less latency per token: all
    ranks compute every token together), else pipeline; an explicit request
    that cannot work raises InvalidArgument saying why and what to use."""
    if requested not in (None, *PARALLEL):
        raise InvalidArgument(f"parallel:{requested} is not a way to split a model; "
                              "use parallel:tensor or parallel:pipeline")
    problems = {"tensor": _tensor_problem(model, group_size),
                "pipeline": _pipeline_problem(model, group_size)}
    if requested is None:
        for way in PARALLEL:
            if problems[way] is None:
                return way
        raise InvalidArgument(f"cannot split this model across {group_size} ranks: "
                              f"{problems['tensor']}; {problems['pipeline']}")
    if problems[requested] is not None:
        other = "pipeline" if requested == "tensor" else "tensor"
        hint = (f"; use parallel:{other}" if problems[other] is None
                else f"; and {problems[other]}")
        raise InvalidArgument(problems[requested] + hint)
    return requested


def shard_model(model, group, parallel: str) -> None:
    """Split `model` in place across `group` the way `choose_parallel` chose.

    Must run before the weights are evaluated: the layers (or weight slices)
    this rank drops are released here, so their lazy weights are never read."""
    if parallel == "tensor":
        model.shard(group)
    elif parallel != "pipeline":
        raise InvalidArgument(f"parallel:{parallel} is not a way to split a model")
    elif callable(getattr(model.model, "pipeline", None)):
        model.model.pipeline(group)
    else:
        model.model = PipelineStage(model.model, group)


def _tensor_problem(model, size):
    """Why `model.shard` cannot split `model` across `size` ranks, or None."""
    if not callable(getattr(model, "shard", None)):
        return "parallel:tensor needs a model that mlx-lm can shard, and this one cannot be"
    layers = list(getattr(model, "layers", None) or [])
    attns = [getattr(layer, "self_attn", None) for layer in layers]
    if not layers or any(not hasattr(a, "n_heads") or not hasattr(a, "n_kv_heads")
                         for a in attns):
        return ("parallel:tensor needs every layer's attention head counts, "
                "and this model does not expose them")
    q = sorted({a.n_heads for a in attns})
    kv = sorted({a.n_kv_heads for a in attns})
    hidden = sorted({_mlp_hidden(layer) for layer in layers} - {None})
    if any(n % size for n in q + kv + hidden):
        mlp = (f" and MLP size ({'/'.join(map(str, hidden))})"
               if any(n % size for n in hidden) else "")
        return (f"parallel:tensor needs the head counts ({'/'.join(map(str, q))} query, "
                f"{'/'.join(map(str, kv))} KV){mlp} to divide by {size} ranks")
    return None


def _mlp_hidden(layer):
    """The MLP's hidden size (the output rows of its up projection), or None
    for MLPs shaped otherwise (mixtures of experts)."""
    mlp = getattr(layer, "mlp", None)
    proj = getattr(mlp, "up_proj", None) or getattr(mlp, "gate_proj", None)
    weight = getattr(proj, "weight", None)
    return None if weight is None else weight.shape[0]


def _pipeline_problem(model, size):
    """Why `model` cannot be split into `size` pipeline stages, or None."""
    inner = getattr(model, "model", None)
    if not callable(getattr(inner, "pipeline", None)):  # then PipelineStage must do
        if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
            return ("parallel:pipeline needs a model with embed_tokens, layers and norm, "
                    "and this one has not")
        if any(getattr(layer, "use_sliding", False) for layer in inner.layers):
            return ("parallel:pipeline does not support this model's sliding-window "
                    "attention layers (mlx-lm has no pipeline for it)")
        name = f"{type(inner).__module__}.{type(inner).__qualname__}"
        if name not in PLAIN_INNER_MODELS:
            return f"parallel:pipeline does not support {name} (mlx-lm has no pipeline for it)"
    if len(inner.layers) < size:
        return (f"parallel:pipeline needs at least one layer per rank: "
                f"{len(inner.layers)} layers, {size} ranks")
    return None


class PipelineStage(nn.Module):
    """This rank's part of a plain inner model (`PLAIN_INNER_MODELS`): the
    embeddings, its block of layers and the final norm, with the inner
    model's call signature, so the outer `Model` works unchanged: its tied LM
    head still finds `embed_tokens`, and `model.layers` (what the KV caches are
    sized from) is just this rank's layers, as with mlx-lm's `pipeline`."""

    def __init__(self, inner, group):
        super().__init__()
        self.group = group
        self.pipeline_rank, self.pipeline_size = group.rank(), group.size()
        # PipelineMixin's even split: low ranks get the extra layers; rank r
        # runs the layers after those of ranks r+1 ... size-1.
        base, extra = divmod(len(inner.layers), self.pipeline_size)
        split = [base + (r < extra) for r in range(self.pipeline_size)]
        start = sum(split[self.pipeline_rank + 1:])
        self.start_idx, self.end_idx = start, start + split[self.pipeline_rank]
        self.embed_tokens = inner.embed_tokens
        # Only this rank's layers are kept: the others (and their lazy
        # weights) are released with `inner`.
        self.layers = inner.layers[self.start_idx:self.end_idx]
        self.norm = inner.norm

    def __call__(self, inputs, cache=None, input_embeddings=None):
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        rank, size = self.pipeline_rank, self.pipeline_size
        if cache is None:
            cache = [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])

        if rank < size - 1:  # the hidden state comes from the stage before
            h = mx.distributed.recv_like(h, rank + 1, group=self.group)
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        if rank > 0:  # and goes on to the next one
            h = mx.distributed.send(h, rank - 1, group=self.group)
            # Callers that evaluate only the cache (mlx-lm's prefill) must
            # still send, or the next stage waits for ever.
            if cache[-1] is not None:
                cache[-1].keys = _depends(cache[-1].keys, h)
        if size > 1:  # every rank gets the last stage's output (rank 0's)
            h = mx.distributed.all_gather(h, group=self.group)[: h.shape[0]]
        return self.norm(h)


def _depends(keys, dependency):
    """`keys` (an array, or a tuple of them for quantized caches) made to
    depend on `dependency`."""
    if isinstance(keys, (tuple, list)):
        return tuple(mx.depends(list(keys), dependency))
    return mx.depends(keys, dependency)
