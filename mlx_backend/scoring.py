"""Score and Embedding: single forward passes, run on the engine thread.

Score computes the prompt's KV state once and reuses a copy of it for each
candidate, so N candidates cost one prompt pass plus N short passes. Both
work in chunks and check between chunks whether their caller has gone, so a
cancelled call stops occupying the engine.
"""

import copy
import dataclasses
from typing import Callable, List, Optional, Tuple

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from .errors import BackendError, Cancelled


@dataclasses.dataclass
class CandidateScore:
    log_prob: float
    token_log_probs: List[float]
    tokens: List[int]


def _never() -> bool:
    return False


def _check(cancelled: Callable[[], bool]):
    if cancelled():
        raise Cancelled("the caller cancelled the request")


def prefill(model, cache, tokens: List[int], step: int,
            cancelled: Callable[[], bool] = _never) -> mx.array:
    """Feed tokens into cache in chunks; return log-probs after the last one."""
    logits = None
    for start in range(0, len(tokens), step):
        _check(cancelled)
        logits = model(mx.array([tokens[start:start + step]]), cache=cache)
        mx.eval([c.state for c in cache])
    last = logits[0, -1].astype(mx.float32)
    return last - mx.logsumexp(last)


def score_candidates(model, cache, rest: List[int], candidates: List[List[int]],
                     step: int = 512, cancelled: Callable[[], bool] = _never,
                     max_kv_size: Optional[int] = None) -> Tuple[List[CandidateScore], list]:
    """Joint log-probability of each candidate's tokens after the prompt.

    `cache` holds the prompt minus `rest`; it ends up holding the whole prompt.
    """
    if cache is None:
        cache = make_prompt_cache(model, max_kv_size)
    first = prefill(model, cache, rest, step, cancelled)
    scores = []
    for tokens in candidates:
        _check(cancelled)
        per_token = [first[tokens[0]]]
        if len(tokens) > 1:
            logits = model(mx.array([tokens[:-1]]), cache=copy.deepcopy(cache))[0]
            logits = logits.astype(mx.float32)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            per_token.extend(logprobs[mx.arange(len(tokens) - 1), mx.array(tokens[1:])])
        values = mx.stack(per_token).tolist()
        scores.append(CandidateScore(sum(values), values, tokens))
    return scores, cache


def embed(model, tokens: List[int], step: int = 512,
          cancelled: Callable[[], bool] = _never) -> List[float]:
    """Mean of the final hidden states, L2-normalised (computed chunk by chunk)."""
    body = getattr(model, "model", None)
    if body is None:
        raise BackendError("this model architecture exposes no hidden states to embed")
    cache = make_prompt_cache(model)
    total = None
    for start in range(0, len(tokens), step):
        _check(cancelled)
        hidden = body(mx.array([tokens[start:start + step]]), cache=cache)[0]
        chunk_sum = hidden.astype(mx.float32).sum(axis=0)
        total = chunk_sum if total is None else total + chunk_sum
        mx.eval(total, [c.state for c in cache])
    pooled = total / len(tokens)
    pooled = pooled / mx.maximum(mx.linalg.norm(pooled), 1e-12)
    return pooled.tolist()
