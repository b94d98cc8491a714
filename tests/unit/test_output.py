"""mlx_backend/output.py (text deltas cut at stop strings, token bytes, strict
JSON logprobs) and mlx_backend/generation.py (stop rule, generation plan)."""

import json
import math

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import greedy_sampler

import backend_pb2
from mlx_backend.generation import StopRule, plan_generation
from mlx_backend.grammar import GrammarProcessor
from mlx_backend.output import (LOGPROB_FLOOR, IncrementalDecoder, TextStream, TokenBytes,
                                logprob_entry)
from mlx_backend.request import build_request

FOX = "The quick brown fox jumps over the lazy dog."
# The tiny tokenizer splits FOX into "The", " quick", " brown", " fox", " jumps", ...


@pytest.fixture(scope="module")
def fox_tokens(loaded):
    tokens = loaded.tokenizer.encode(FOX)
    pieces = [loaded.tokenizer.decode([t]) for t in tokens]
    assert pieces[:5] == ["The", " quick", " brown", " fox", " jumps"]
    return tokens


def feed(tokenizer, tokens, stops=(), finish=True):
    text = TextStream(tokenizer, (), stops)
    chunks = [text.add(t) for t in tokens]
    if finish:
        chunks.append(text.finish())
    return chunks, text


# ---- TextStream: stop strings ---------------------------------------------------------------

def test_without_stops_every_token_is_released_at_once(loaded, fox_tokens):
    chunks, text = feed(loaded.tokenizer, fox_tokens)
    assert chunks[:4] == ["The", " quick", " brown", " fox"]
    assert "".join(chunks) == FOX and chunks[-1] == "" and not text.stopped


def test_stop_string_across_token_boundaries(loaded, fox_tokens):
    chunks, text = feed(loaded.tokenizer, fox_tokens, ["brown fox"])
    # " brown" could start the stop: "brown" is held, only the space goes out.
    assert chunks[:4] == ["The", " quick", " ", ""]
    assert text.stopped and all(c == "" for c in chunks[4:])
    assert "".join(chunks) == "The quick "


def test_held_back_text_is_released_once_it_cannot_be_a_stop(loaded, fox_tokens):
    chunks, text = feed(loaded.tokenizer, fox_tokens, ["brown cat"])
    assert chunks[2:4] == [" ", "brown fox"]
    assert "".join(chunks) == FOX and not text.stopped


def test_finish_flushes_text_held_for_a_stop_that_never_came(loaded, fox_tokens):
    stream = TextStream(loaded.tokenizer, (), ["dog!"])
    released = "".join(stream.add(t) for t in fox_tokens[:-1])  # up to " dog"
    assert released == "The quick brown fox jumps over the lazy "
    assert stream.finish() == "dog"
    assert not stream.stopped


def test_stop_string_inside_one_token(loaded, fox_tokens):
    chunks, _ = feed(loaded.tokenizer, fox_tokens, ["uic"])
    assert "".join(chunks) == "The q"


def test_of_stops_completed_by_one_token_the_earliest_wins(loaded, fox_tokens):
    chunks, _ = feed(loaded.tokenizer, fox_tokens, ["lazy", "own", "row"])
    assert "".join(chunks) == "The quick b"


def test_the_first_stop_to_complete_ends_the_text(loaded, fox_tokens):
    # "quick brown fox jumps" would start earlier, but "fox" is complete first.
    chunks, _ = feed(loaded.tokenizer, fox_tokens, ["quick brown fox jumps", "fox"])
    assert chunks[:4] == ["The", " ", "", "quick brown "]
    assert "".join(chunks) == "The quick brown "


def test_empty_stop_strings_are_ignored(loaded, fox_tokens):
    chunks, text = feed(loaded.tokenizer, fox_tokens, [""])
    assert "".join(chunks) == FOX and not text.stopped


@pytest.mark.parametrize("stop", ["n f", " brown fox jumps", ".", "The", "dog.", "x", "e l",
                                  "over the lazy dog.!", "o"])
def test_output_is_the_text_before_the_first_stop_and_no_chunk_holds_part_of_it(
        loaded, fox_tokens, stop):
    chunks, text = feed(loaded.tokenizer, fox_tokens, [stop])
    cut = FOX.find(stop)
    assert "".join(chunks) == (FOX[:cut] if cut >= 0 else FOX)
    assert text.stopped == (cut >= 0)
    released = ""
    for chunk in chunks:  # text seen so far never ends inside the stop string
        released += chunk
        assert stop not in released


def test_nothing_after_a_stop(loaded, fox_tokens):
    stream = TextStream(loaded.tokenizer, (), ["quick"])
    for t in fox_tokens[:2]:
        stream.add(t)
    assert stream.stopped
    assert stream.add(fox_tokens[2]) == "" and stream.finish() == ""


# ---- IncrementalDecoder ---------------------------------------------------------------------

class PieceTokenizer:
    """SentencePiece-style: U+2581 marks a space, and decoding drops the
    leading space of a text, as sentencepiece does."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        text = "".join(self.pieces[i] for i in ids).replace("\u2581", " ")
        return text[1:] if text.startswith(" ") else text


class ByteTokenizer:
    """Each id is some raw bytes; broken UTF-8 decodes to U+FFFD, as with HF."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


PIECES = PieceTokenizer(["\u2581The", "\u2581fox", "\u2581jumps", "!"])


def test_leading_space_is_dropped_without_the_prompt_tail():
    decoder = IncrementalDecoder(PIECES)
    assert [decoder.add(1), decoder.add(2), decoder.add(3)] == ["fox", " jumps", "!"]


def test_leading_space_is_kept_when_seeded_with_the_prompt_tail():
    decoder = IncrementalDecoder(PIECES, prompt_tail=[0])
    assert [decoder.add(1), decoder.add(2), decoder.add(3)] == [" fox", " jumps", "!"]


BYTES = ByteTokenizer([b"a", b"\xc3", b"\xa9", b"\xe2", b"\x82", b"\xac", b"\xf0", b"\x9f",
                       b"\x98", b"\x80", b"x\xc3", b"\xa9y"])


def test_multi_byte_characters_are_released_only_whole():
    decoder = IncrementalDecoder(BYTES)
    out = [decoder.add(t) for t in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0]]
    assert out == ["a", "", "\u00e9", "", "", "\u20ac", "", "", "", "\U0001f600", "a"]


def test_a_token_ending_inside_a_character_waits_for_the_rest():
    decoder = IncrementalDecoder(BYTES)
    assert decoder.add(10) == ""  # "x" and half of "é": nothing yet
    assert decoder.add(11) == "x\u00e9y"


def test_final_releases_an_incomplete_character():
    decoder = IncrementalDecoder(BYTES)
    assert decoder.add(0) == "a" and decoder.add(3) == ""
    assert decoder.add(None, final=True) == "\ufffd"
    assert decoder.add(None, final=True) == ""


def test_incremental_text_equals_the_whole_decode(loaded):
    tok = loaded.tokenizer
    tokens = tok.encode("Hello world!\nHow are you today? I am fine, thank you.")
    decoder = IncrementalDecoder(tok, prompt_tail=tok.encode("Say:"))
    assert "".join(decoder.add(t) for t in tokens) == tok.decode(tokens)


# ---- TokenBytes -----------------------------------------------------------------------------

def test_token_bytes_of_a_byte_level_tokenizer(loaded, tok):
    token_bytes = TokenBytes(loaded.tokenizer)
    (fox,) = loaded.tokenizer.encode(" fox")
    assert loaded.tokenizer.convert_ids_to_tokens(fox) == "\u0120fox"
    assert token_bytes(fox) == b" fox"
    (newline,) = loaded.tokenizer.encode("\n")
    assert token_bytes(newline) == b"\n"
    assert token_bytes(loaded.tokenizer.eos_token_id) == b"<|im_end|>"
    think = tok.convert_tokens_to_ids("<think>")
    assert TokenBytes(tok)(think) == b"<think>"  # an added token: its text as is


class SentencePieceLike:
    def __init__(self):
        self._detokenizer = object()  # not mlx-lm's BPE detokenizer
        self.pieces = {0: "<0xE2>", 1: "\u2581hello", 2: None, 3: "<0x0A>", 4: "caf\u00e9"}
        self.lookups = 0

    def convert_ids_to_tokens(self, token_id):
        self.lookups += 1
        return self.pieces[token_id]


def test_token_bytes_of_a_sentencepiece_tokenizer():
    tokenizer = SentencePieceLike()
    token_bytes = TokenBytes(tokenizer)
    assert [token_bytes(i) for i in range(5)] == [b"\xe2", b" hello", b"", b"\n",
                                                  "caf\u00e9".encode()]
    assert token_bytes(1) == b" hello" and tokenizer.lookups == 5  # remembered


# ---- logprob_entry: strict JSON -------------------------------------------------------------

def test_logprob_entry_is_strict_json(tok):
    token_bytes = TokenBytes(tok)
    inf, nan = float("inf"), float("nan")
    cases = [
        ([-0.5, -inf, nan, -1.5, inf, -3.0e38], 0, 5),
        ([-inf, -0.1, -2.0, nan], 0, 4),        # chosen token masked to -inf
        ([nan, nan, nan, nan], 1, 3),           # all NaN
        ([-inf] * 4, 2, 20),                    # top_n beyond the vocabulary
    ]
    for values, chosen, top_n in cases:
        entry = logprob_entry(token_bytes, chosen, mx.array(values), top_n)
        json.dumps(entry, allow_nan=False)
        assert math.isfinite(entry["logprob"])
        assert all(math.isfinite(a["logprob"]) for a in entry["top_logprobs"])
        assert len(entry["top_logprobs"]) == min(top_n, sum(map(math.isfinite, values)))
    entry = logprob_entry(token_bytes, 1, mx.array([-0.5, -inf, nan, -1.5, inf]), 5)
    assert entry["logprob"] == LOGPROB_FLOOR
    assert [a["id"] for a in entry["top_logprobs"]] == [0, 3]  # non-finite ones dropped
    entry = logprob_entry(token_bytes, 2, mx.array([-0.5, -inf, nan]), 0)
    assert entry["logprob"] == LOGPROB_FLOOR and entry["top_logprobs"] == []
    # Magnitudes beyond float32 (a float64 row) are clamped into its range.
    huge = mx.array([-1e300, -0.25, 1e300], dtype=mx.float64)
    entry = logprob_entry(token_bytes, 0, huge, 3)
    json.loads(json.dumps(entry, allow_nan=False))
    assert -3.5e38 < entry["logprob"] < -3.3e38
    assert all(abs(a["logprob"]) < 3.5e38 for a in entry["top_logprobs"])


def test_logprob_entry_keeps_ordinary_values(tok):
    entry = logprob_entry(TokenBytes(tok), 1, mx.array([-2.0, -0.25, -1.0, -3.0]), 2)
    assert entry["logprob"] == -0.25
    assert [(a["id"], a["logprob"]) for a in entry["top_logprobs"]] == [(1, -0.25), (2, -1.0)]


def test_logprob_entry_describes_tokens(loaded):
    tok = loaded.tokenizer
    (fox,) = tok.encode(" fox")
    row = mx.full((len(tok),), -10.0)
    row[fox] = -0.5
    entry = logprob_entry(TokenBytes(tok), fox, row, 1)
    assert entry == {"id": fox, "token": " fox", "bytes": list(b" fox"), "logprob": -0.5,
                     "top_logprobs": [{"id": fox, "token": " fox", "bytes": list(b" fox"),
                                       "logprob": -0.5}]}


# ---- StopRule -------------------------------------------------------------------------------

def rule_for(loaded, **fields):
    fields.setdefault("Prompt", "Say")
    req = build_request(backend_pb2.PredictOptions(**fields), loaded)
    return StopRule(loaded.tokenizer, req)


def test_end_of_sequence_stops_and_flushes_held_text(loaded, fox_tokens):
    rule = rule_for(loaded, Tokens=10, StopPrompts=["fox jumps"])
    out = [rule.add(t) for t in fox_tokens[1:4]]  # " quick", " brown", " fox"
    assert out == [" quick", " brown", " "] and rule.reason is None
    eos = loaded.tokenizer.eos_token_id
    assert rule.is_eos(eos)
    assert rule.add(eos) == "fox"
    assert (rule.reason, rule.cause) == ("stop", "end of sequence")
    assert rule.generated == 3  # the end-of-sequence token is not counted


def test_stop_string_stops(loaded, fox_tokens):
    rule = rule_for(loaded, Tokens=10, StopPrompts=["brown fox"])
    out = [rule.add(t) for t in fox_tokens[:4]]
    assert "".join(out) == "The quick "
    assert (rule.reason, rule.cause) == ("stop", "stop string")


def test_token_budget_stops_with_length_and_flushes(loaded, fox_tokens):
    rule = rule_for(loaded, Tokens=3, StopPrompts=["fox jumps"])
    assert rule.max_tokens == 3
    out = [rule.add(t) for t in fox_tokens[1:3]]
    assert rule.reason is None
    out.append(rule.add(fox_tokens[3]))
    assert out == [" quick", " brown", " fox"]  # the held "fox" comes out at the end
    assert (rule.reason, rule.cause) == ("length", "token budget")


def test_a_stop_string_on_the_last_budget_token_is_stop(loaded, fox_tokens):
    rule = rule_for(loaded, Tokens=2, StopPrompts=["brown"])
    assert rule.add(fox_tokens[1]) == " quick"
    assert rule.add(fox_tokens[2]) == " "
    assert rule.reason == "stop"


def test_ignore_eos(loaded):
    eos = loaded.tokenizer.eos_token_id
    rule = rule_for(loaded, Tokens=5, IgnoreEOS=True)
    assert not rule.is_eos(eos)
    assert rule.add(eos) == "<|im_end|>" and rule.reason is None
    assert not rule.stop_sequences().matcher().advance(eos)


def test_stop_sequences_are_the_end_of_sequence_tokens(loaded, fox_tokens):
    sequences = rule_for(loaded, Tokens=5).stop_sequences()
    assert sequences.matcher().advance(loaded.tokenizer.eos_token_id)
    matcher = sequences.matcher()
    assert not any(matcher.advance(t) for t in fox_tokens)


# ---- plan_generation ------------------------------------------------------------------------

def plan_for(loaded, **fields):
    fields.setdefault("Prompt", "Say")
    fields.setdefault("Tokens", 4)
    req = build_request(backend_pb2.PredictOptions(**fields), loaded)
    return plan_generation(req, loaded.tokenizer), req


def test_greedy_requests_share_mlx_lms_greedy_sampler(loaded):
    a, _ = plan_for(loaded)
    b, _ = plan_for(loaded, Seed=5, TopK=3)
    assert a.sampler is greedy_sampler and b.sampler is greedy_sampler


def test_a_sampled_request_gets_its_own_sampler(loaded):
    plan, _ = plan_for(loaded, Temperature=0.5, Seed=5)
    assert plan.sampler is not greedy_sampler
    row = mx.zeros((1, len(loaded.tokenizer)))
    again, _ = plan_for(loaded, Temperature=0.5, Seed=5)
    assert [plan.sampler(row).item() for _ in range(5)] == \
        [again.sampler(row).item() for _ in range(5)]


def test_processors_follow_the_request(loaded):
    assert plan_for(loaded)[0].processors == []
    assert len(plan_for(loaded, LogitBias='{"5": 1}')[0].processors) == 1
    assert len(plan_for(loaded, LogitBias='{"5": 1}', Penalty=1.3,
                        PresencePenalty=0.5)[0].processors) == 3


def test_a_grammar_adds_its_own_processor(loaded):
    plan, req = plan_for(loaded, LogitBias='{"5": 1}', Grammar='root ::= "yes" | "no"')
    assert len(plan.processors) == 2 and isinstance(plan.processors[-1], GrammarProcessor)
    other = plan_generation(req, loaded.tokenizer)
    assert other.processors[-1] is not plan.processors[-1]  # one matcher per request
    assert other.processors[-1].matcher is not plan.processors[-1].matcher


def test_the_plan_stops_by_the_request(loaded):
    plan, req = plan_for(loaded, Tokens=7, StopPrompts=["x"])
    assert isinstance(plan.stop, StopRule) and plan.stop.max_tokens == 7
    assert plan.stop.reason is None
