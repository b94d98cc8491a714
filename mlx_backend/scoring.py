"""Score and Embedding: single forward passes, run on the engine thread.

Score computes the prompt's KV state once and reuses a copy of it for each
candidate, so N candidates cost one prompt pass plus N short passes.
"""

import copy
import dataclasses
from typing import List, Tuple

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from .errors import BackendError


@dataclasses.dataclass
class CandidateScore:
    log_prob: float
    token_log_probs: List[float]
    tokens: List[int]


def prefill(model, cache, tokens: List[int], step: int) -> mx.array:
    """Feed tokens into cache in chunks; return log-probs after the last one."""
    logits = None
    for start in range(0, len(tokens), step):
        logits = model(mx.array([tokens[start:start + step]]), cache=cache)
        mx.eval([c.state for c in cache])
    last = logits[0, -1].astype(mx.float32)
    return last - mx.logsumexp(last)


def score_candidates(model, cache, rest: List[int], candidates: List[List[int]],
                     step: int = 512) -> Tuple[List[CandidateScore], list]:
    """Joint log-probability of each candidate's tokens after the prompt.

    `cache` holds the prompt minus `rest`; it ends up holding the whole prompt.
    """
    if cache is None:
        cache = make_prompt_cache(model)
    first = prefill(model, cache, rest, step)
    scores = []
    for tokens in candidates:
        per_token = [first[tokens[0]]]
        if len(tokens) > 1:
            logits = model(mx.array([tokens[:-1]]), cache=copy.deepcopy(cache))[0]
            logits = logits.astype(mx.float32)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            per_token.extend(logprobs[mx.arange(len(tokens) - 1), mx.array(tokens[1:])])
        values = mx.stack(per_token).tolist()
        scores.append(CandidateScore(sum(values), values, tokens))
    return scores, cache


def embed(model, tokens: List[int]) -> List[float]:
    """Mean of the final hidden states, L2-normalised."""
    body = getattr(model, "model", None)
    if body is None:
        raise BackendError("this model architecture exposes no hidden states to embed")
    hidden = body(mx.array([tokens]))[0].astype(mx.float32)
    pooled = hidden.mean(axis=0)
    pooled = pooled / mx.maximum(mx.linalg.norm(pooled), 1e-12)
    return pooled.tolist()
