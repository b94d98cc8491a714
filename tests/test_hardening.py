"""The engine survives anything one request can do: hostile JSON shapes are
INVALID_ARGUMENT naming the field, malformed tool calls a model writes come
back as content, and logprobs are always strict JSON.

In-process unit tests (no server): a tiny marker model (<think>/<tool_call>
tokens, a Qwen-style tool template) is loaded with mlx-lm and requests go
through `mlx_backend.request.build_request` as the servicer calls it.
"""

import json
import math
import types

import mlx.core as mx
import mlx_lm
import pytest

import backend_pb2
from mlx_backend import chat, request
from mlx_backend.errors import BackendError, InvalidArgument
from mlx_backend.grammar import compile_grammar
from mlx_backend.options import ModelSettings
from mlx_backend.output import LOGPROB_FLOOR, TokenBytes, logprob_entry
from mlx_backend.response_parser import ResponseParser
from tiny_model import build_tiny_model

M = backend_pb2.Message
DEEP = 100_000       # json.loads raises RecursionError on this many levels
MODERATE = 500       # parses, but is far beyond what templates/compilers should see
TOOLS = json.dumps([{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}])


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = build_tiny_model(tmp_path_factory.mktemp("hardening") / "tiny-markers",
                              markers=True)
    _, tokenizer = mlx_lm.load(str(folder))
    assert tokenizer.has_tool_calling and tokenizer.tool_parser is not None
    return types.SimpleNamespace(tokenizer=tokenizer, settings=ModelSettings(),
                                 context_length=2048)


@pytest.fixture(scope="module")
def tok(loaded):
    return loaded.tokenizer


def nested_array(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_object(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def chat_options(**fields):
    fields.setdefault("Messages", [M(role="user", content="hi")])
    return backend_pb2.PredictOptions(UseTokenizerTemplate=True, Tokens=8, **fields)


def assert_invalid(loaded, opts, field):
    with pytest.raises(InvalidArgument) as info:
        request.build_request(opts, loaded)
    assert field in str(info.value), str(info.value)
    return str(info.value)


# ---- 1. deep JSON in every JSON field -------------------------------------------------------

def _tool_calls_with_arguments(arguments: str) -> str:
    return json.dumps([{"id": "c1", "type": "function",
                        "function": {"name": "get_weather", "arguments": arguments}}])


DEEP_FIELDS = {
    "LogitBias": lambda d: dict(LogitBias='{"1": ' + nested_array(d) + "}"),
    "Tools": lambda d: dict(Tools=nested_array(d)),
    "Messages[1].tool_calls": lambda d: dict(Messages=[
        M(role="user", content="hi"),
        M(role="assistant", content="", tool_calls=nested_array(d))]),
    "Messages[1].tool_calls[0].function.arguments": lambda d: dict(Messages=[
        M(role="user", content="hi"),
        M(role="assistant", content="", tool_calls=_tool_calls_with_arguments(
            nested_object(d)))]),
    "Metadata.chat_template_kwargs": lambda d: dict(
        Metadata={"chat_template_kwargs": '{"x": ' + nested_array(d) + "}"}),
    "Grammar": lambda d: dict(Grammar='{"type": "object", "x": ' + nested_object(d) + "}"),
}


@pytest.mark.parametrize("depth", [DEEP, MODERATE], ids=["recursion-error", "moderate"])
@pytest.mark.parametrize("field", list(DEEP_FIELDS))
def test_deep_json_is_invalid_argument_naming_the_field(loaded, field, depth):
    message = assert_invalid(loaded, chat_options(**DEEP_FIELDS[field](depth)), field)
    if field == "Grammar":
        assert message.startswith("Grammar is invalid: ")
    assert "nested too deeply" in message


def test_deep_json_in_a_raw_prompt_request(loaded):
    opts = backend_pb2.PredictOptions(Prompt="hi", Tokens=4)
    for fields, field in [(dict(Tools=nested_array(DEEP)), "Tools"),
                          (dict(LogitBias=nested_array(DEEP)), "LogitBias"),
                          (dict(Grammar=nested_array(DEEP)), "Grammar"),
                          (dict(Grammar=nested_object(MODERATE)), "Grammar")]:
        bad = backend_pb2.PredictOptions()
        bad.CopyFrom(opts)
        for name, value in fields.items():
            setattr(bad, name, value)
        assert_invalid(loaded, bad, field)


def test_depth_limit_is_exact():
    ok = nested_array(chat.MAX_JSON_DEPTH)
    assert chat.parse_json(ok, "X", list)
    with pytest.raises(InvalidArgument, match="X is nested too deeply"):
        chat.parse_json(nested_array(chat.MAX_JSON_DEPTH + 1), "X", list)
    # Many siblings are not depth.
    assert len(chat.parse_json("[" + ",".join(["[[1]]"] * 5000) + "]", "X", list)) == 5000


def test_oversized_and_non_standard_json_is_invalid_argument():
    with pytest.raises(InvalidArgument, match="Tools is too large"):
        chat.parse_json(" " * (chat.MAX_JSON_CHARS + 1), "Tools", list)
    for constant in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(InvalidArgument, match="Tools is not valid JSON"):
            chat.parse_json(f"[{constant}]", "Tools", list)


def test_grammar_deep_json_is_invalid_but_gbnf_and_schemas_still_compile(tok):
    for text in (nested_array(DEEP), nested_object(DEEP), nested_object(MODERATE)):
        with pytest.raises(InvalidArgument) as info:
            compile_grammar(text, tok)
        assert str(info.value).startswith("Grammar is invalid: ")
    schema = {"type": "string"}
    for _ in range(30):  # 31 levels of JSON: within the limit
        schema = {"type": "array", "items": schema}
    assert compile_grammar(json.dumps(schema), tok).kind == "json_schema"
    assert compile_grammar('root ::= "yes" | "no"', tok).kind == "gbnf"
    with pytest.raises(InvalidArgument, match="^Grammar is invalid: "):
        compile_grammar("[1, 2]", tok)  # JSON but not a schema: tried as GBNF


def test_valid_chat_request_still_builds(loaded):
    req = request.build_request(chat_options(
        Messages=[M(role="user", content="Weather?"),
                  M(role="assistant", content="", tool_calls=_tool_calls_with_arguments(
                      '{"city": "Oslo"}')),
                  M(role="tool", content="sunny", tool_call_id="c1")],
        Tools=TOOLS, LogitBias='{"5": 2.5}',
        Metadata={"chat_template_kwargs": '{"custom": {"nested": [1, 2]}}'}), loaded)
    assert req.tools[0]["function"]["name"] == "get_weather"
    assert req.sampling.logit_bias == {5: 2.5}
    text = loaded.tokenizer.decode(req.prompt_tokens)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in text


# ---- 2. malformed tool calls from the model -------------------------------------------------

def parse(tok, text, tools=None, patch=None):
    parser = ResponseParser(tok, [], tools)
    if patch is not None:
        parser._tool_parser = patch
    content, _ = parser.feed(text)
    tail, _ = parser.finish()
    return content + tail, parser


MALFORMED = [
    "1", '"x"', "[1,2]", "[]", "null", "not json", "{", nested_array(DEEP),
    '{"name": 5, "arguments": {}}', '{"name": ["f"], "arguments": {}}',
    '{"arguments": {"city": "Paris"}}', '{"name": "", "arguments": {}}',
    '{"name": "f", "arguments": 5}', '{"name": "f", "arguments": [1, 2]}',
    '{"name": "f", "arguments": null}', '{"name": "f", "arguments": {"x": 1e999}}',
    '[{"name": "f", "arguments": {}}, 7]',  # one bad call spoils its block, not others
]


@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_tool_call_comes_back_as_content(tok, body):
    content, parser = parse(tok, f"Sure.<tool_call>{body}</tool_call>")
    assert content == "Sure."
    assert parser.tool_calls() == []
    assert parser.rejected_text() == f"<tool_call>{body}</tool_call>"


def test_well_formed_calls_beside_malformed_ones(tok):
    good = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    text = (f"A<tool_call>{good}</tool_call> B<tool_call>1</tool_call>"
            f'<tool_call>{{"name": "lookup", "arguments": "raw text", "id": "mine"}}</tool_call>'
            f'<tool_call>{{"name": "bye", "parameters": {{"n": 1}}}}</tool_call>'
            f"<tool_call>{{\"name\": \"f\"")  # cut off by max tokens: no end marker
    content, parser = parse(tok, text)
    assert content == "A B"
    calls = parser.tool_calls()
    assert [(c["index"], c["name"]) for c in calls] == [(0, "get_weather"), (1, "lookup"),
                                                        (2, "bye")]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert calls[1]["arguments"] == "raw text" and calls[1]["id"] == "mine"
    assert json.loads(calls[2]["arguments"]) == {"n": 1}
    assert calls[0]["id"].startswith("call_")
    assert parser.rejected_text() == '<tool_call>1</tool_call><tool_call>{"name": "f"'
    assert parser.tool_calls() == calls  # stable: same ids on a second call
    for call in calls:  # what backend.py builds from them
        backend_pb2.ToolCallDelta(**call)


def test_call_without_arguments_and_odd_ids(tok):
    _, parser = parse(tok, '<tool_call>{"name": "now", "id": 12}</tool_call>')
    (call,) = parser.tool_calls()
    assert call["arguments"] == "{}" and call["id"].startswith("call_")
    assert parser.rejected_text() == ""


@pytest.mark.parametrize("error", [ValueError, KeyError, TypeError, AttributeError,
                                   RuntimeError, RecursionError, IndexError])
def test_a_parser_that_raises_anything_never_escapes(tok, error):
    def boom(text, tools=None):
        raise error("boom")

    content, parser = parse(tok, "x<tool_call>whatever</tool_call>y", patch=boom)
    assert content == "xy"
    assert parser.tool_calls() == []
    assert parser.rejected_text() == "<tool_call>whatever</tool_call>"


@pytest.mark.parametrize("result", [None, 1, "name", {"name": "f", "arguments": {1, 2}},
                                    {"name": "f", "arguments": {"b": b"x"}},
                                    [{"name": "f"}, None], object()])
def test_a_parser_returning_odd_shapes(tok, result):
    _, parser = parse(tok, "<tool_call>x</tool_call>", patch=lambda text, tools=None: result)
    assert parser.tool_calls() == []
    assert parser.rejected_text() == "<tool_call>x</tool_call>"


def test_a_parser_that_trips_over_the_tools_is_retried_without_them(tok):
    def picky(text, tools=None):
        if tools is not None:
            return [t["function"]["name"] for t in tools]  # KeyError on these tools
        return {"name": "f", "arguments": {}}

    _, parser = parse(tok, "<tool_call>x</tool_call>", tools=[{"type": "function"}],
                      patch=picky)
    assert [c["name"] for c in parser.tool_calls()] == ["f"]
    assert parser.rejected_text() == ""


def test_model_without_tool_parser(tok):
    _, parser = parse(tok, "<tool_call>{}</tool_call>", patch=None)
    parser._tool_parser = None
    assert parser.tool_calls() == [] and parser.rejected_text() == "<tool_call>{}</tool_call>"


# ---- 3. logprobs are strict JSON ------------------------------------------------------------

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


# ---- 4. LogitBias ---------------------------------------------------------------------------

def test_logit_bias_is_clamped_to_openai_range():
    bias = request._logit_bias('{"1": 1e39, "2": -1e39, "3": 50, "4": -7.5}', 100)
    assert bias == {1: 100.0, 2: -100.0, 3: 50.0, 4: -7.5}
    assert request._logit_bias('{"5": ' + "9" * 400 + "}", 100) == {5: 100.0}
    assert request._logit_bias('{"5": -' + "9" * 400 + "}", 100) == {5: -100.0}
    assert all(type(v) is float for v in request._logit_bias('{"1": 3}', 10).values())


@pytest.mark.parametrize("text, fragment", [
    ('{"1": 1e400}', "finite"),          # parses to inf
    ('{"1": NaN}', "not valid JSON"),
    ('{"1": -Infinity}', "not valid JSON"),
    ('{"1": true}', "finite number"),
    ('{"1": "big"}', "finite number"),
    ('{"1": [1]}', "finite number"),
    ('{"1": null}', "finite number"),
    ('{"x": 1}', "not a token id"),
    ('{"' + "1" * 5000 + '": 1}', "not a token id"),
    ('{"100": 1}', "outside the vocabulary"),
    ('{"-1": 1}', "outside the vocabulary"),
    ("[1]", "must be a JSON object"),
    (json.dumps({str(i): 1 for i in range(101)}), "more than the vocabulary"),
])
def test_bad_logit_bias_is_invalid_argument(text, fragment):
    with pytest.raises(InvalidArgument) as info:
        request._logit_bias(text, 100)
    message = str(info.value)
    assert "LogitBias" in message and fragment in message, message
    assert len(message) < 300


def test_logit_bias_through_build_request(loaded):
    req = request.build_request(backend_pb2.PredictOptions(
        Prompt="hi", Tokens=4, LogitBias='{"5": 1e39}'), loaded)
    assert req.sampling.logit_bias == {5: 100.0}
    assert_invalid(loaded, backend_pb2.PredictOptions(
        Prompt="hi", Tokens=4, LogitBias=json.dumps({str(i): 1 for i in range(
            len(loaded.tokenizer) + 1)})), "LogitBias")


# ---- 5. other client shapes -----------------------------------------------------------------

@pytest.mark.parametrize("fields, fragment", [
    (dict(Tools="[1]"), "Tools[0] must be a JSON object"),
    (dict(Tools='[{"function": "f"}]'), "Tools[0].function must be a JSON object"),
    (dict(Tools='{"a": 1}'), "Tools must be a JSON array"),
    (dict(Metadata={"chat_template_kwargs": '{"tokenize": true}'}),
     "Metadata.chat_template_kwargs may not set tokenize"),
    (dict(Metadata={"chat_template_kwargs": '{"add_generation_prompt": false, '
                                            '"chat_template": "{{ 1 }}"}'}),
     "Metadata.chat_template_kwargs may not set add_generation_prompt, chat_template"),
    (dict(Metadata={"chat_template_kwargs": "[1]"}),
     "Metadata.chat_template_kwargs must be a JSON object"),
    (dict(Messages=[M(role="assistant", content="", tool_calls="[1]")]),
     "Messages[0].tool_calls[0]: each call needs a 'function' object"),
    (dict(Messages=[M(role="assistant", content="", tool_calls='{"function": {}}')]),
     "Messages[0].tool_calls must be a JSON array"),
    (dict(Messages=[M(role="assistant", content="",
                      tool_calls='[{"function": {"name": 5, "arguments": "{}"}}]')]),
     "Messages[0].tool_calls[0].function.name must be a non-empty string"),
    (dict(Messages=[M(role="assistant", content="",
                      tool_calls='[{"function": {"arguments": "{}"}}]')]),
     "Messages[0].tool_calls[0].function.name"),
])
def test_bad_shapes_are_invalid_argument_naming_the_field(loaded, fields, fragment):
    assert_invalid(loaded, chat_options(**fields), fragment)


def test_tool_call_arguments_that_are_not_json_stay_a_string(loaded):
    req = request.build_request(chat_options(Messages=[
        M(role="user", content="hi"),
        M(role="assistant", content="", tool_calls=_tool_calls_with_arguments("not json"))]),
        loaded)
    assert '"arguments": "not json"' in loaded.tokenizer.decode(req.prompt_tokens)


def test_template_that_returns_no_text_is_invalid_argument():
    class Odd:
        has_chat_template = True

        def apply_chat_template(self, *args, **kwargs):
            return [1, 2, 3]

    with pytest.raises(InvalidArgument, match="rendered a list"):
        chat.render_chat(Odd(), [{"role": "user", "content": "hi"}], {})


def test_every_failure_here_is_a_backend_error(loaded):
    """A sweep of hostile values over every JSON field: only BackendErrors."""
    hostile = ["", "[", "{", "]", "null", "0", '""', "[[]]", '{"": {}}', nested_array(DEEP),
               nested_object(MODERATE), '{"a": NaN}', "\u0000",
               '[{"function": null}]', '[{"function": {"name": "f", "arguments": 1}}]']
    for value in hostile:
        for fields in (dict(Tools=value), dict(LogitBias=value), dict(Grammar=value),
                       dict(Metadata={"chat_template_kwargs": value}),
                       dict(Messages=[M(role="user", content="hi"),
                                      M(role="assistant", content="", tool_calls=value)])):
            try:
                request.build_request(chat_options(**fields), loaded)
            except BackendError:
                pass
