"""Per-request samplers and logits processors built from mlx-lm's pieces.

Each request owns its random key, so a seeded request draws the same tokens
whether it runs alone or beside others, and never disturbs anyone else's
randomness. The filters (top-p, min-p, top-k, XTC) and the penalties are
mlx-lm's own.
"""

import dataclasses
import random
from typing import Callable, Dict, List, Optional

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    greedy_sampler,
    apply_top_k,
    apply_top_p,
    apply_xtc,
    make_logits_processors,
)


MIN_TEMPERATURE = 1e-3


@dataclasses.dataclass
class SamplingParams:
    """One request's resolved controls (defaults live in options.ModelSettings)."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    repeat_last_n: int
    presence_penalty: float
    frequency_penalty: float
    logit_bias: Dict[int, float]
    xtc_probability: float
    xtc_threshold: float
    seed: Optional[int]

    @property
    def greedy(self) -> bool:
        """Temperatures too small to sample at (1/T would overflow the logits)
        are argmax, which is what they tend to anyway."""
        return self.temperature < MIN_TEMPERATURE


def make_sampler(params: SamplingParams, vocab_size: int,
                 special_tokens: List[int] = ()) -> Callable[[mx.array], mx.array]:
    """A sampler over one row of log-probabilities with its own random key.

    Greedy requests share one function, so a batch of them is decoded with a
    single batched argmax instead of one call per row.
    """
    if params.greedy:
        return greedy_sampler

    seed = params.seed if params.seed is not None else random.getrandbits(63)
    # Two streams of keys from the seed: one for sampling, one for XTC's
    # coin, so enabling XTC does not shift the sampling draws.
    state = {"key": mx.random.key(seed), "xtc": mx.random.key(seed ^ 0x5BD1E995)}
    inv_temp = 1.0 / params.temperature

    def next_key(stream="key"):
        state[stream], step_key = mx.random.split(state[stream])
        return step_key

    def xtc(x):
        # mlx-lm's apply_xtc flips its coin with the global random state; the
        # coin comes from this request's own key instead (always heads at 1).
        masked = apply_xtc(x, 1.0, params.xtc_threshold, list(special_tokens))
        if params.xtc_probability >= 1.0:
            return masked
        return mx.where(mx.random.uniform(key=next_key("xtc")) < params.xtc_probability,
                        masked, x)

    filters = []
    if 0 < params.top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, params.top_p))
    if params.min_p > 0:
        filters.append(lambda x: apply_min_p(x, params.min_p))
    if params.xtc_probability > 0:
        filters.append(xtc)
    if 0 < params.top_k < vocab_size:
        filters.append(lambda x: apply_top_k(x, params.top_k))

    def sampler(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        return mx.random.categorical(logprobs * inv_temp, key=next_key())

    return sampler


def make_processors(params: SamplingParams) -> list:
    """Logit bias and penalties over the last `repeat_last_n` tokens (a window
    of 0 turns the penalties off, as in llama.cpp)."""
    window = params.repeat_last_n
    penalty = params.repetition_penalty
    return make_logits_processors(
        logit_bias=params.logit_bias or None,
        repetition_penalty=penalty if window and penalty and penalty != 1.0 else None,
        repetition_context_size=window,
        presence_penalty=params.presence_penalty if window else None,
        presence_context_size=window,
        frequency_penalty=params.frequency_penalty if window else None,
        frequency_context_size=window,
    )
