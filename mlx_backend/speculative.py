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


class PromptLookupDraft:
    """A draft without weights: it proposes the tokens that followed the last
    occurrence of the current n-gram earlier in the sequence (prompt lookup,
    as llama.cpp offers). It pays on prompts whose answer repeats long spans
    of the prompt: summaries, edits, extraction, code.

    It looks like a model to mlx-lm's speculative step: called on tokens with
    its cache, it returns logits that put all the mass on its guess.
    """

    NGRAM_MAX = 4
    weights_bytes = 0
    source = "prompt lookup"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.model = self  # the engine reads `.model` from a loaded draft

    def make_cache(self):
        return [_TokenHistory()]

    def __call__(self, inputs: mx.array, cache):
        history = cache[0]
        history.extend(inputs.reshape(-1).tolist())
        guess = history.guess(self.NGRAM_MAX)
        logits = mx.where(mx.arange(self.vocab_size) == guess, 0.0, -1e9)
        return logits.reshape(1, 1, self.vocab_size)


class _TokenHistory:
    """The draft's "cache": the tokens seen so far, rewindable like a KV cache,
    with where each n-gram starts, so a guess does not scan the sequence."""

    def __init__(self, ngram_max: int = PromptLookupDraft.NGRAM_MAX):
        self.tokens: List[int] = []
        self._ngram_max = ngram_max
        self._starts = {}  # n-gram tuple -> the positions it starts at, in order

    @property
    def offset(self) -> int:
        return len(self.tokens)

    @property
    def state(self):
        return []

    def extend(self, tokens: List[int]):
        for token in tokens:
            self.tokens.append(token)
            last = len(self.tokens) - 1
            for n in range(1, min(self._ngram_max, last + 1) + 1):
                start = last - n + 1
                self._starts.setdefault(tuple(self.tokens[start:]), []).append(start)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(n, len(self.tokens))
        del self.tokens[len(self.tokens) - n:]
        return n  # index entries past the end are dropped when met

    def guess(self, ngram_max: int) -> int:
        """The token after the latest earlier match of the longest suffix n-gram
        (the last token again when nothing matches: a cheap, usually wrong guess)."""
        tokens, length = self.tokens, len(self.tokens)
        for n in range(min(ngram_max, length - 1), 0, -1):
            suffix = tuple(tokens[-n:])
            starts = self._starts.get(suffix, [])
            while starts and starts[-1] + n > length:  # indexed before a trim
                starts.pop()
            for start in reversed(starts):
                if start + n < length and tuple(tokens[start:start + n]) == suffix:
                    return tokens[start + n]
        return tokens[-1] if tokens else 0


def _feed(model, cache, tokens: List[int], step: int) -> None:
    for start in range(0, len(tokens), step):
        model(mx.array([tokens[start:start + step]]), cache=cache)
        mx.eval([c.state for c in cache])  # the logits are not needed: never computed


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
