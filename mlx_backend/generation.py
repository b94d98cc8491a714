"""Per-request generation state, built from a checked request in one place.

`plan_generation` turns a `GenerationRequest` into what decides its tokens:
a sampler, logits processors (bias, penalties, grammar) and a `StopRule`,
the way text-generation-inference builds a "next token chooser" and
"stopping criteria" per request. The engine only wires them into the batch.
"""

import dataclasses
from typing import Callable, List, Optional

from mlx_lm.generate import StopSequences

from .output import TextStream
from .request import GenerationRequest
from .sampling import make_processors, make_sampler


class StopRule:
    """Every reason one request stops: an end-of-sequence token, a stop string
    in the text, or its token budget.

    `reason` is set to OpenAI's name for it ("stop" or "length") once the
    request must end; `cause` says which in words, for the log. Text is
    detokenized here too, since stop strings are matched on text.
    """

    def __init__(self, tokenizer, request: GenerationRequest):
        self.eos_ids = frozenset() if request.ignore_eos else frozenset(tokenizer.eos_token_ids)
        self.max_tokens = request.max_tokens
        self.generated = 0
        self.reason: Optional[str] = None
        self.cause = ""
        self._text = TextStream(tokenizer, request.prompt_tokens[-4:], request.stop_strings)

    def stop_sequences(self) -> StopSequences:
        """End-of-sequence tokens for the batch generator, so a row that ends
        on one leaves the batch in the same step."""
        return StopSequences([(token,) for token in sorted(self.eos_ids)])

    def is_eos(self, token: int) -> bool:
        return token in self.eos_ids

    def add(self, token: int) -> str:
        """Take one generated token; return the text it releases."""
        if self.is_eos(token):
            self.end("stop", "end of sequence")
            return self._text.finish()
        self.generated += 1
        text = self._text.add(token)
        if self._text.stopped:
            self.end("stop", "stop string")
        elif self.generated >= self.max_tokens:
            self.end("length", "token budget")
            text += self._text.finish()
        return text

    def end(self, reason: str, cause: str):
        self.reason, self.cause = reason, cause


@dataclasses.dataclass
class GenerationPlan:
    sampler: Callable
    processors: List[Callable]
    stop: StopRule


def plan_generation(request: GenerationRequest, tokenizer) -> GenerationPlan:
    """Sampler, logits processors and stop rule for one request."""
    sampler = make_sampler(request.sampling, len(tokenizer), list(tokenizer.eos_token_ids))
    processors = make_processors(request.sampling)
    if request.grammar is not None:
        processors.append(request.grammar.processor())
    return GenerationPlan(sampler, processors, StopRule(tokenizer, request))
