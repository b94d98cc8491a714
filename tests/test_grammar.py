"""Grammar-constrained decoding (mlx_backend/grammar.py) on a tiny random model.

Generation is driven the way the engine drives it: an mlx-lm BatchGenerator,
one logits processor per request, EOS as the stop sequence. A random model
emits garbage, so whatever it produces under a grammar being valid is a real
test of the mask; several requests in one batch prove per-request isolation.
"""

import json
import re

import jsonschema
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import BatchGenerator, StopSequences

from mlx_backend.errors import BackendError, InvalidArgument
from mlx_backend.grammar import compile_grammar, llg_tokenizer
from tiny_model import build_tiny_model

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
YES_NO = 'root ::= "yes" | "no"'
ARITHMETIC = r"""
root ::= expr
expr ::= term (op term){0,4}
op   ::= "+" | "-" | "*"
term ::= num | "(" num op num ")"
num  ::= [0-9]{1,3}
"""
NUM = r"[0-9]{1,3}"
TERM = rf"(?:{NUM}|\({NUM}[-+*]{NUM}\))"
ARITHMETIC_RE = rf"{TERM}(?:[-+*]{TERM}){{0,4}}"
# llama.cpp's grammars/json.gbnf (comments, {m,n} repetition, \x escapes).
LLAMA_CPP_JSON = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"""
# The shape of LocalAI's own JSON-schema-to-GBNF output for function calls
# (dashed rule names, tab indentation, [^\x00]).
LOCALAI_FUNCTIONS = r"""root-0-arguments-location ::= string
root-0-arguments ::= "{" space "\"location\"" space ":" space root-0-arguments-location "}" space
root-0-name ::= "\"get_weather\""
root-0 ::= "{" space "\"arguments\"" space ":" space root-0-arguments "," space "\"name\"" space ":" space root-0-name "}" space
root ::= root-0 | mixedstring
space ::= " "?
string ::= "\"" (
	[^"\\] |
	"\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])
)* "\"" space
freestring ::= (
		[^\x00] |
		"\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])
  )* space
mixedstring ::= freestring | freestring ( root-0 ) freestring
"""
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = build_tiny_model(tmp_path_factory.mktemp("grammar") / "tiny")
    return mlx_lm.load(str(folder))


@pytest.fixture(scope="module")
def model(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def tok(loaded):
    return loaded[1]


@pytest.fixture(scope="module")
def prompt(tok):
    return tok.apply_chat_template(
        [{"role": "user", "content": "Tell me about a person."}],
        add_generation_prompt=True)


def greedy(logprobs):
    return mx.argmax(logprobs, axis=-1)


def seeded(seed, temperature=1.0):
    """A categorical sampler with its own key (as mlx_backend.sampling does)."""
    state = {"key": mx.random.key(seed)}

    def sampler(logprobs):
        state["key"], step = mx.random.split(state["key"])
        return mx.random.categorical(logprobs / temperature, key=step)

    return sampler


def run(model, tok, prompt, requests, max_tokens=MAX_TOKENS):
    """Generate for [(processor or None, sampler)] in one batch.

    Returns [(text without EOS, finish_reason, token ids)] in request order.
    """
    eos = sorted(tok.eos_token_ids)
    gen = BatchGenerator(model)
    try:
        uids = gen.insert(
            prompts=[list(prompt) for _ in requests],
            max_tokens=[max_tokens] * len(requests),
            logits_processors=[[p] if p is not None else [] for p, _ in requests],
            samplers=[s for _, s in requests],
            stop_sequences=[StopSequences([(e,) for e in eos]) for _ in requests],
        )
        tokens = {uid: [] for uid in uids}
        finish = {}
        while len(finish) < len(uids):
            for r in gen.next_generated():
                tokens[r.uid].append(r.token)
                if r.finish_reason is not None:
                    finish[r.uid] = r.finish_reason
    finally:
        gen.close()
    out = []
    for uid in uids:
        ids = tokens[uid]
        text = tok.decode([t for t in ids if t not in eos])
        out.append((text, finish[uid], ids))
    return out


def assert_stopped(tok, finish, ids, max_tokens=MAX_TOKENS):
    assert finish == "stop", (finish, ids)
    assert ids[-1] in tok.eos_token_ids
    assert len(ids) < max_tokens
    assert not any(t in tok.eos_token_ids for t in ids[:-1])


def assert_person(text):
    value = json.loads(text)
    jsonschema.validate(value, PERSON)
    return value


# ---- compiling -----------------------------------------------------------------------------


def test_json_object_is_a_schema_anything_else_gbnf(tok):
    assert compile_grammar(json.dumps(PERSON), tok).kind == "json_schema"
    assert compile_grammar(YES_NO, tok).kind == "gbnf"
    # Surrounding whitespace is fine for both.
    assert compile_grammar("\n  " + json.dumps(PERSON) + "\n\t", tok).kind == "json_schema"
    assert compile_grammar("\n\n" + YES_NO + "\n\n", tok).kind == "gbnf"
    # Lark (llguidance syntax) passes through the GBNF path too.
    assert compile_grammar('start: "a" | "b"', tok).kind == "gbnf"


@pytest.mark.parametrize("grammar, fragment", [
    ('root ::= "yes', "Grammar is invalid: "),                      # unterminated literal
    ('root ::= foo', "Rule 'foo' not found"),                        # undefined rule
    ('answer ::= "yes"', "No 'root' rule found"),                   # no root
    ('root ::= [a-', "Grammar is invalid: "),                        # broken class
    ('root ::= [z-a]', "the start must be <= the end"),              # bad range
    ('root ::= x{2,1}\nx ::= "a"', "range end must be >= start"),
    ('{"type": 5}', "type must be a string or array of strings"),    # JSON, bad schema
    ('{"type": "object", "properties": {"a": {"$ref": "#/nope"}}}', "'/nope' does not exist"),
    ('{"type": "string", "pattern": "("}', "unclosed group"),
    ('[1, 2]', "Grammar is invalid: "),                              # JSON, not an object
    ("   \n ", "empty"),
])
def test_invalid_grammar_is_invalid_argument(tok, grammar, fragment):
    with pytest.raises(InvalidArgument) as info:
        compile_grammar(grammar, tok)
    message = str(info.value)
    assert message.startswith("Grammar is invalid: "), message
    assert fragment in message, message
    assert len(message) > len("Grammar is invalid: ") + 3


def test_llguidance_tokenizer_is_cached_and_uses_the_eos(tok):
    a = compile_grammar(YES_NO, tok)
    b = compile_grammar(json.dumps(PERSON), tok)
    assert a.lltok is b.lltok is llg_tokenizer(tok)
    assert sorted(a.lltok.eos_tokens) == sorted(tok.eos_token_ids)
    assert a.eos_ids == sorted(tok.eos_token_ids)


def test_localai_function_grammar_compiles_and_runs(model, tok, prompt):
    spec = compile_grammar(LOCALAI_FUNCTIONS, tok)
    proc = spec.processor()
    ((text, finish, ids),) = run(model, tok, prompt, [(proc, greedy)], max_tokens=30)
    assert "\x00" not in text
    assert not any(t in tok.all_special_ids for t in ids if t not in tok.eos_token_ids)


def test_llama_cpp_json_gbnf_compiles_and_constrains(model, tok, prompt):
    spec = compile_grammar(LLAMA_CPP_JSON, tok)
    ((text, finish, ids),) = run(model, tok, prompt, [(spec.processor(), greedy)],
                                 max_tokens=40)
    assert text.startswith("{"), text


# ---- generation ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [None, 0, 1, 2, 3])
def test_json_schema_output_validates(model, tok, prompt, seed):
    spec = compile_grammar(json.dumps(PERSON), tok)
    sampler = greedy if seed is None else seeded(seed)
    ((text, finish, ids),) = run(model, tok, prompt, [(spec.processor(), sampler)])
    assert_stopped(tok, finish, ids)
    assert_person(text)


@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_gbnf_yes_no(model, tok, prompt, seed):
    spec = compile_grammar(YES_NO, tok)
    sampler = greedy if seed is None else seeded(seed)
    ((text, finish, ids),) = run(model, tok, prompt, [(spec.processor(), sampler)])
    assert_stopped(tok, finish, ids)
    assert re.fullmatch("yes|no", text), text


@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_gbnf_arithmetic(model, tok, prompt, seed):
    spec = compile_grammar(ARITHMETIC, tok)
    sampler = greedy if seed is None else seeded(seed, temperature=2.0)
    ((text, finish, ids),) = run(model, tok, prompt, [(spec.processor(), sampler)])
    assert_stopped(tok, finish, ids)
    assert re.fullmatch(ARITHMETIC_RE, text), text


def test_unconstrained_model_does_not_produce_these(model, tok, prompt):
    """Sanity: without a grammar the random model does not emit valid output."""
    ((text, finish, ids),) = run(model, tok, prompt, [(None, greedy)], max_tokens=60)
    assert not re.fullmatch("yes|no", text)
    with pytest.raises(ValueError):
        json.loads(text)


def test_batch_of_three_is_isolated(model, tok, prompt):
    schema = compile_grammar(json.dumps(PERSON), tok)
    gbnf = compile_grammar(ARITHMETIC, tok)
    solo = [run(model, tok, prompt, [(p, greedy)])[0]
            for p in (schema.processor(), gbnf.processor(), None)]
    batch = run(model, tok, prompt, [(schema.processor(), greedy),
                                     (gbnf.processor(), greedy),
                                     (None, greedy)])
    (j_text, j_finish, j_ids), (a_text, a_finish, a_ids), (u_text, _, u_ids) = batch
    assert_stopped(tok, j_finish, j_ids)
    assert_person(j_text)
    assert_stopped(tok, a_finish, a_ids)
    assert re.fullmatch(ARITHMETIC_RE, a_text), a_text
    # Nobody's mask leaks into anyone else: each row decodes as it does alone.
    assert [r[2] for r in batch] == [r[2] for r in solo]
    assert u_ids == solo[2][2]


def test_same_spec_many_requests_sampled(model, tok, prompt):
    spec = compile_grammar(json.dumps(PERSON), tok)
    out = run(model, tok, prompt, [(spec.processor(), seeded(s)) for s in range(4)])
    for text, finish, ids in out:
        assert_stopped(tok, finish, ids)
        assert_person(text)


def test_join_a_running_batch(model, tok, prompt):
    """A constrained request joining mid-generation (continuous batching)."""
    eos = sorted(tok.eos_token_ids)
    yes_no = compile_grammar(YES_NO, tok)
    schema = compile_grammar(json.dumps(PERSON), tok)
    gen = BatchGenerator(model)
    try:
        stop = [StopSequences([(e,) for e in eos])]
        (first,) = gen.insert(prompts=[prompt], max_tokens=[60], samplers=[greedy],
                              logits_processors=[[]], stop_sequences=stop)
        tokens, finish = {first: []}, {}
        for _ in range(5):
            for r in gen.next_generated():
                tokens[r.uid].append(r.token)
        second, third = gen.insert(
            prompts=[prompt[:-3], prompt], max_tokens=[MAX_TOKENS] * 2,
            samplers=[greedy, seeded(5)],
            logits_processors=[[schema.processor()], [yes_no.processor()]],
            stop_sequences=stop * 2)
        tokens.update({second: [], third: []})
        while len(finish) < 3:
            for r in gen.next_generated():
                tokens[r.uid].append(r.token)
                if r.finish_reason:
                    finish[r.uid] = r.finish_reason
    finally:
        gen.close()
    assert_stopped(tok, finish[second], tokens[second])
    assert_person(tok.decode(tokens[second][:-1]))
    assert_stopped(tok, finish[third], tokens[third])
    assert tok.decode(tokens[third][:-1]) in ("yes", "no")


# ---- the processor by hand -----------------------------------------------------------------


def allowed(logits):
    row = np.array(logits.astype(mx.float32))[0]
    return set(np.nonzero(row > -np.inf)[0].tolist())


def test_processor_masks_then_only_eos(tok, prompt):
    spec = compile_grammar(YES_NO, tok)
    proc = spec.processor()
    vocab = len(tok._tokenizer)
    logits = mx.zeros((1, vocab))
    first = allowed(proc(mx.array(prompt), logits))
    assert first
    for t in first:  # every allowed token starts an answer
        piece = tok.decode([t])
        assert piece and ("yes".startswith(piece) or "no".startswith(piece)), piece
    history = list(prompt)
    for t in tok.encode("yes", add_special_tokens=False):
        history.append(t)
        out = proc(mx.array(history), logits)
    # Done: EOS only, and EOS again stays fine (ignore_eos keeps generating).
    assert allowed(out) == set(tok.eos_token_ids)
    for _ in range(2):
        history.append(sorted(tok.eos_token_ids)[0])
        assert allowed(proc(mx.array(history), logits)) == set(tok.eos_token_ids)


def test_processor_padded_and_short_vocab(tok, prompt):
    spec = compile_grammar(YES_NO, tok)
    vocab = len(tok._tokenizer)
    padded = spec.processor()(mx.array(prompt), mx.zeros((1, vocab + 37), mx.bfloat16))
    assert padded.shape == (1, vocab + 37) and padded.dtype == mx.bfloat16
    ids = allowed(padded)
    assert ids and max(ids) < vocab
    reference = allowed(spec.processor()(mx.array(prompt), mx.zeros((1, vocab))))
    assert ids == reference
    short = spec.processor()(mx.array(prompt), mx.zeros((1, max(ids) + 1)))
    assert allowed(short) == reference


def test_processor_rejected_token_is_backend_error(tok, prompt):
    spec = compile_grammar(YES_NO, tok)
    proc = spec.processor()
    logits = mx.zeros((1, len(tok._tokenizer)))
    ok = allowed(proc(mx.array(prompt), logits))
    bad = next(t for t in tok.encode("maybe", add_special_tokens=False) if t not in ok)
    with pytest.raises(BackendError) as info:
        proc(mx.array(list(prompt) + [bad]), logits)
    assert "not allowed by the grammar" in str(info.value)


def test_processors_from_one_spec_are_independent(tok, prompt):
    spec = compile_grammar(YES_NO, tok)
    logits = mx.zeros((1, len(tok._tokenizer)))
    a, b = spec.processor(), spec.processor()
    start = allowed(a(mx.array(prompt), logits))
    b(mx.array(prompt), logits)
    yes = tok.encode("yes", add_special_tokens=False)
    for i in range(len(yes)):
        a(mx.array(list(prompt) + yes[:i + 1]), logits)
    # b has seen nothing generated; a fresh one starts where b is.
    assert allowed(b(mx.array(prompt), logits)) == start
    assert allowed(spec.processor()(mx.array(prompt), logits)) == start
