"""Grammar-constrained decoding with llguidance.

LocalAI sends `PredictOptions.Grammar` as either a JSON schema (the string
parses as a JSON object) or a GBNF grammar (llama.cpp's format; Lark syntax as
llguidance understands it is accepted too). `compile_grammar` turns it into a
`GrammarSpec` once per request; `GrammarSpec.processor()` makes the request's
own mlx-lm logits processor, which masks every token the grammar forbids.

Processor contract (mlx-lm): `processor(tokens, logits) -> logits`, `logits`
of shape (1, vocab), `tokens` all tokens of the sequence so far, ending with
the token just fed to the model. The first call ends with the last prompt
token; every later call has grown by the token sampled at the previous step,
which the processor feeds to its matcher before computing the next mask.

Termination: the llguidance tokenizer is built with the wrapper's EOS ids
(`TokenizerWrapper.eos_token_ids`, which the engine also stops on). When the
grammar is complete and cannot be extended, the mask allows only those EOS
ids; while it is complete but could go on, EOS is allowed beside the
continuations. Logit columns beyond the tokenizer's vocabulary (a padded
embedding) are always masked.
"""

from __future__ import annotations

import threading
import weakref
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .chat import load_json
from .errors import BackendError, FailedPrecondition, InvalidArgument

__all__ = ["GrammarSpec", "compile_grammar", "compile_lark", "llg_tokenizer"]

_NEG_INF_BITS = 0xFF800000  # float32 -inf as a bit pattern
_ERROR_CHARS = 500  # how much of a matcher's (possibly huge) error text to keep

# JSON schema compile options; a schema's own "x-guidance" object overrides
# them. llguidance's default whitespace is unbounded ([ \t\n\r]+ between any
# two tokens), which lets a model loop on newlines forever; like llama.cpp's
# json-schema-to-grammar we allow at most 20 whitespace characters in a row.
JSON_DEFAULTS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,20}"}

# LLTokenizer per tokenizer object: (eos ids it was built with, LLTokenizer).
_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


def _short(message: str) -> str:
    """A matcher's error on one line: its first line and any `error:` lines
    (the rest are source excerpts and, at run time, a parser state dump)."""
    message = (message or "").split("<state>")[0].strip()
    lines = [line.strip() for line in message.splitlines()]
    if not lines:
        return "unknown error"
    kept = [lines[0]] + [line for line in lines[1:] if line.startswith("error:")]
    return " ".join(kept)[:_ERROR_CHARS]


def _eos_ids(tokenizer) -> List[int]:
    ids = getattr(tokenizer, "eos_token_ids", None)
    ids = sorted(int(i) for i in (ids or ()) if i is not None)
    if not ids:
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        eos = getattr(hf, "eos_token_id", None)
        if eos is not None:
            ids = [int(eos)]
    return ids


def llg_tokenizer(tokenizer):
    """The llguidance tokenizer for an mlx-lm `TokenizerWrapper`, built once.

    Cached per tokenizer object (weakly, so unloading a model frees it) and
    rebuilt only if the wrapper's EOS ids change (`add_eos_token`).
    """
    eos = tuple(_eos_ids(tokenizer))
    with _TOKENIZERS_LOCK:
        try:
            cached = _TOKENIZERS.get(tokenizer)
        except TypeError:  # not weak-referenceable: build without caching
            cached = None
        if cached is not None and cached[0] == eos:
            return cached[1]
        lltok = _build_llg_tokenizer(tokenizer, eos)
        try:
            _TOKENIZERS[tokenizer] = (eos, lltok)
        except TypeError:
            pass
        return lltok


def _build_llg_tokenizer(tokenizer, eos: Sequence[int]):
    import llguidance.hf

    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    try:
        return llguidance.hf.from_tokenizer(hf, eos_token=list(eos) or None)
    except ValueError as err:
        raise FailedPrecondition(
            f"grammars need a fast (tokenizers-backed) tokenizer: {err}") from err


def _grammar_text(grammar: str) -> Tuple[str, str]:
    """(kind, llguidance grammar) for LocalAI's Grammar field."""
    import llguidance

    text = grammar.strip()
    if not text:
        raise InvalidArgument("Grammar is invalid: the grammar is empty")
    parsed = None
    if text[0] in "{[":  # GBNF and Lark start with a rule name or a directive
        try:
            # Depth- and size-limited: a deep schema would otherwise raise
            # RecursionError here or exhaust llguidance's stack later.
            parsed = load_json(text, "the JSON schema")
        except ValueError:  # not JSON after all: the GBNF parser will say why
            parsed = None
        except InvalidArgument as err:
            raise InvalidArgument(f"Grammar is invalid: {err}") from None
    if isinstance(parsed, dict):
        try:
            return "json_schema", llguidance.LLMatcher.grammar_from_json_schema(
                parsed, defaults=JSON_DEFAULTS)
        except Exception as err:  # ValueError/TypeError; a deep schema, RecursionError
            raise InvalidArgument(f"Grammar is invalid: {err}") from err
    try:
        # GBNF, or Lark when it already looks like Lark (`start:`/`%llguidance`).
        return "gbnf", llguidance.grammar_from("gbnf", text)
    except Exception as err:  # the converter raises ValueError; be safe
        raise InvalidArgument(f"Grammar is invalid: {err}") from err


def compile_grammar(grammar: str, tokenizer) -> "GrammarSpec":
    """Compile LocalAI's Grammar field against a tokenizer.

    A string that parses as a JSON object is a JSON schema; anything else is
    GBNF. Raises `InvalidArgument("Grammar is invalid: ...")` with the parser's
    message when the grammar or schema is invalid.
    """
    kind, text = _grammar_text(grammar)
    return _compile(kind, text, tokenizer, "Grammar")


def compile_lark(lark: str, tokenizer, *, kind: str = "lark",
                 what: str = "the grammar") -> "GrammarSpec":
    """Compile a Lark grammar in llguidance's dialect (special tokens as
    `<name>` or `<[id]>`, inline `%json {...}` schemas) built by the backend
    itself, such as a tool-choice grammar. Errors are `InvalidArgument`
    starting with `what`."""
    import llguidance

    try:
        text = llguidance.LLMatcher.grammar_from_lark(lark)
    except Exception as err:  # documented not to raise; be safe
        raise InvalidArgument(f"{what} is invalid: {_short(str(err))}") from err
    return _compile(kind, text, tokenizer, what)


def _compile(kind: str, text: str, tokenizer, what: str) -> "GrammarSpec":
    import llguidance

    lltok = llg_tokenizer(tokenizer)
    # Building the matcher compiles the grammar (and reports its errors); it
    # is kept pristine as the template each request's matcher is copied from.
    try:
        matcher = llguidance.LLMatcher(lltok, text, log_level=0)
    except Exception as err:  # errors are normally reported by is_error(); be safe
        raise InvalidArgument(f"{what} is invalid: {_short(str(err))}") from err
    if matcher.is_error():
        raise InvalidArgument(f"{what} is invalid: {_short(matcher.get_error())}")
    return GrammarSpec(kind, text, lltok, matcher)


class GrammarSpec:
    """A compiled grammar; `processor()` gives each request its own matcher."""

    def __init__(self, kind: str, grammar: str, lltok, template):
        self.kind = kind          # "json_schema", "gbnf", "tool_choice", "lark"
        self.grammar = grammar    # the llguidance grammar text
        self.lltok = lltok
        self.eos_ids = list(lltok.eos_tokens)
        self._template = template
        self._lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return self.lltok.vocab_size

    def processor(self) -> "GrammarProcessor":
        """A fresh per-request logits processor (its own matcher).

        A token the grammar rejects (or a state where no token may follow)
        raises `BackendError` from the processor call; the engine's guard
        around each request's processors turns that into a failure of that
        request alone.
        """
        with self._lock:
            matcher = self._template.deep_copy()
        return GrammarProcessor(self, matcher)


class GrammarProcessor:
    """mlx-lm logits processor driving one llguidance matcher.

    Per step: feed the new token(s) to the matcher, compute the token bitmask
    into a reused buffer, expand it to one byte per token and add 0 / -inf.
    """

    def __init__(self, spec: GrammarSpec, matcher):
        self.spec = spec
        self.matcher = matcher
        self._start: Optional[int] = None  # len(tokens) at the first call
        self._consumed = 0                 # generated tokens fed to the matcher
        words = (spec.vocab_size + 31) // 32
        self._bitmask = np.zeros(words, dtype=np.int32)
        self._inverted = np.zeros(words, dtype=np.int32)
        self._inverted_bytes = self._inverted.view(np.uint8)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        n = int(tokens.size)
        if self._start is None:
            self._start = n
        else:
            new = n - self._start - self._consumed
            if new < 0:
                raise BackendError(
                    "grammar: the token history shrank; a grammar processor "
                    "cannot be shared or reused")
            if new:
                new_tokens = tokens.reshape(-1)[n - new:].tolist()
                self._consumed += new
                self._consume(new_tokens)
        # Let the forward pass run while the CPU computes the mask.
        mx.async_eval(logits)
        self._compute_mask()
        return self._apply(logits)

    def _fail(self, message: str):
        raise BackendError(message)

    def _consume(self, new_tokens: List[int]):
        m = self.matcher
        eos = self.spec.eos_ids
        for token in new_tokens:
            if token in eos and m.is_stopped():
                continue  # EOS after the grammar is done: nothing to check
            if not m.consume_token(token):
                return self._fail(
                    f"grammar: generated token {token} "
                    f"{self.spec.lltok.dbg_tokens([token])} is not allowed by the "
                    f"grammar: {_short(m.get_error())}")

    def _compute_mask(self):
        m = self.matcher
        m.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        if m.is_error():
            self._fail(f"grammar: {_short(m.get_error())}")

    def _apply(self, logits: mx.array) -> mx.array:
        # One byte per token, 1 = forbidden (bits past the tokenizer's vocab
        # are 0 in the bitmask, so they come out forbidden too).
        np.invert(self._bitmask, out=self._inverted)
        forbidden = np.unpackbits(self._inverted_bytes, bitorder="little")
        vocab = logits.shape[-1]
        if forbidden.shape[0] >= vocab:
            forbidden = forbidden[:vocab]
        else:  # padded embedding: ids past the tokenizer are never allowed
            forbidden = np.concatenate(
                [forbidden, np.ones(vocab - forbidden.shape[0], np.uint8)])
        if forbidden.all():
            self._fail("grammar: no token can continue the output")
            return self._apply(logits)
        # 0 -> +0.0 and 1 -> -inf by bit pattern: an exact -inf bias made of
        # cheap elementwise ops (mx.where is slow on the CPU backend).
        bias = (mx.array(forbidden).astype(mx.uint32) * _NEG_INF_BITS).view(mx.float32)
        if logits.dtype != mx.float32:
            bias = bias.astype(logits.dtype)
        return logits + bias
