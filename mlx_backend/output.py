"""Shaping generated tokens into what the client sees: text deltas cut at stop
strings, and OpenAI-shaped log-probabilities.

Stop strings are matched on text, not tokens, so they are found across token
boundaries. Text that could still become a stop string is held back until it
cannot, so no chunk ever carries a part of a stop string.
"""

import math
from typing import List, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, _byte_decoder


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class IncrementalDecoder:
    """Text of a growing token sequence, released only in whole characters.

    Decodes a short window (a few earlier tokens plus the new ones) and emits
    what the new tokens added, the way text-generation-inference does. Seeding
    the window with the prompt's last tokens keeps a leading space that a
    tokenizer would drop at the start of a text.
    """

    def __init__(self, tokenizer, prompt_tail=()):
        self._tokenizer = tokenizer
        self._ids = list(prompt_tail)
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False)

    def add(self, token: int, final: bool = False) -> str:
        if token is not None:
            self._ids.append(int(token))
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""


class TextStream:
    """Incremental detokenizer with stop-string cutting for one request."""

    def __init__(self, tokenizer, prompt_tail=(), stop_strings: Sequence[str] = ()):
        self._decoder = IncrementalDecoder(tokenizer, prompt_tail)
        self._stops = [s for s in stop_strings if s]
        self._pending = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """Feed one token; return the newly releasable text ("" if none)."""
        return self._release(self._decoder.add(token), final=False)

    def finish(self) -> str:
        """Flush at the end of generation (text held for a stop that never came)."""
        if self.stopped:
            return ""
        return self._release(self._decoder.add(None, final=True), final=True)

    def _release(self, segment: str, final: bool) -> str:
        if self.stopped:
            return ""
        self._pending += segment
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            out, self._pending, self.stopped = self._pending[:cut], "", True
        else:
            keep = 0 if final else _held_back(self._pending, self._stops)
            split = len(self._pending) - keep
            out, self._pending = self._pending[:split], self._pending[split:]
        return out


class TokenBytes:
    """Raw bytes of single tokens, for logprobs (a token may be part of a
    UTF-8 character, so its text alone cannot say)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._byte_level = isinstance(tokenizer._detokenizer, BPEStreamingDetokenizer)
        self._known = {}

    def __call__(self, token_id: int) -> bytes:
        raw = self._known.get(token_id)
        if raw is None:
            raw = self._known[token_id] = self._lookup(int(token_id))
        return raw

    def _lookup(self, token_id: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if self._byte_level:
            decoder = _byte_decoder()
            if all(c in decoder for c in piece):
                return bytes(decoder[c] for c in piece)
            return piece.encode("utf-8")  # an added token, stored verbatim
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback
        return piece.replace("\u2581", " ").encode("utf-8")


# Logprobs go to LocalAI as JSON, which has no NaN or Infinity. A chosen
# token whose log-probability is not finite (a grammar- or bias-masked -inf,
# or NaN from overflowing logits) is reported at this floor instead; finite
# values are clamped into float32's range.
LOGPROB_FLOOR = -9999.0
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _finite_logprob(value: float) -> Optional[float]:
    """A JSON-safe log-probability, or None if the value is not finite."""
    value = float(value)
    if not math.isfinite(value):
        return None
    return min(max(value, -_FLOAT32_MAX), _FLOAT32_MAX)


def logprob_entry(token_bytes: TokenBytes, token: int, logprobs: mx.array,
                  top_n: int) -> dict:
    """One OpenAI `content` entry: the chosen token and its top alternatives.

    Always strict JSON (`json.dumps(entry, allow_nan=False)` works): the
    chosen token's logprob is floored to LOGPROB_FLOOR when it is not finite,
    and alternatives that are not finite (masked tokens) are left out, so
    there may be fewer than `top_n` of them.
    """
    def describe(tid: int, lp: float) -> dict:
        raw = token_bytes(tid)
        return {"id": tid, "token": raw.decode("utf-8", errors="replace"),
                "bytes": list(raw), "logprob": lp}

    chosen = _finite_logprob(logprobs[token].item())
    entry = describe(int(token), LOGPROB_FLOOR if chosen is None else chosen)
    alternatives: List[dict] = []
    if top_n > 0:
        top_n = min(top_n, logprobs.shape[-1])
        # NaN and +inf rank as -inf, so they never crowd out real alternatives.
        ranked = mx.where(mx.isfinite(logprobs), logprobs, -mx.inf)
        ids = mx.argpartition(-ranked, kth=top_n - 1)[:top_n]
        values = ranked[ids]
        order = mx.argsort(-values)
        for tid, lp in zip(ids[order].tolist(), values[order].tolist()):
            lp = _finite_logprob(lp)
            if lp is not None:
                alternatives.append(describe(tid, lp))
    entry["top_logprobs"] = alternatives
    return entry
