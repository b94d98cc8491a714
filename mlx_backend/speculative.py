"""Speculative decoding for a request that runs alone.

A draft model proposes a few tokens and the target checks them all in one
forward pass (mlx-lm's `speculative_generate_step`); with greedy decoding the
output is exactly the target's own, token for token. It pays when one
request runs: with several, a batched decode step already keeps the hardware
busy. So the engine speculates only for a greedy request that is alone, and
hands it to the batch (its KV cache as it stands) the moment another
request arrives; nobody waits for someone else's drafts.
"""

from typing import List, Tuple

import mlx.core as mx
from mlx_lm.generate import speculative_generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import greedy_sampler

from .errors import InvalidArgument


def check_vocabulary(target_tokenizer, draft_tokenizer, draft_name: str) -> None:
    """A draft must speak the target's token ids, or its proposals mean nothing."""
    target, draft = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if target != draft:
        differ = len(set(target.items()) ^ set(draft.items()))
        raise InvalidArgument(f"DraftModel {draft_name!r} has a different vocabulary than the "
                              f"model ({len(draft)} vs {len(target)} tokens, {differ} entries "
                              f"differ): the draft must share the model's tokenizer")


def _feed(model, cache, tokens: List[int], step: int) -> None:
    for start in range(0, len(tokens), step):
        model(mx.array([tokens[start:start + step]]), cache=cache)
        mx.eval([c.state for c in cache])


class SoloSpeculation:
    """One request decoded with a draft, a round (drafts + the target's own
    token) at a time, until it ends or joins the batch."""

    def __init__(self, target, draft, cache, cached_tokens: List[int], rest: List[int],
                 num_draft: int, max_tokens: int, processors, stream, prefill_step: int):
        if cache is None:
            cache = make_prompt_cache(target)
        draft_cache = make_prompt_cache(draft)
        # The draft must see what the target's cache already holds.
        _feed(draft, draft_cache, cached_tokens, prefill_step)
        self.cache = cache
        self.num_draft = num_draft
        self._left = max_tokens  # tokens the steps may still yield
        self.drafted = 0
        self.accepted = 0
        self._steps = speculative_generate_step(
            mx.array(rest), target, draft, stream, num_draft_tokens=num_draft,
            max_tokens=max_tokens, sampler=greedy_sampler,
            logits_processors=processors or None, prompt_cache=list(cache) + draft_cache,
            prefill_step_size=prefill_step)

    def round(self) -> List[Tuple[int, mx.array]]:
        """The tokens of one round, with their log-probabilities ([] at the end)."""
        planned = min(self.num_draft, self._left)  # what mlx-lm drafts this round
        tokens = []
        for token, logprobs, from_draft in self._steps:
            tokens.append((int(token), logprobs))
            self._left -= 1
            if not from_draft:
                break
            self.accepted += 1
        if tokens:
            self.drafted += planned
        return tokens

    def close(self):
        """Stop drafting; return the target's KV cache, rewound to the tokens
        it has verified (mlx-lm rewinds it when the steps are closed)."""
        self._steps.close()
        return self.cache
