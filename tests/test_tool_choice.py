"""ToolChoice is enforced: `required` and a named function always give a call
that the tool parser reads and whose arguments follow the tool's schema;
`none` never lets a tool-call marker out.

The tiny random model (built with <think>/<tool_call> markers and a Hermes /
Qwen style template, so mlx-lm picks the json_tools parser) is sampled at
Temperature 0.8 over several seeds: whatever it writes under the grammar
being a valid call is a real test of the grammar.
"""

import json
import threading

import grpc
import jsonschema
import pytest
from tokenizers import Tokenizer

import backend_pb2
from tiny_model import build_tiny_model

M = backend_pb2.Message
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
BOOKING = {
    "type": "object",
    "properties": {
        "people": {"type": "integer", "minimum": 1, "maximum": 20},
        "time": {"type": "string", "enum": ["lunch", "dinner"]},
        "vip": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 8},
    },
    "required": ["people", "time"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "book_table": BOOKING}
TOOLS = json.dumps([{"type": "function", "function": {"name": name, "parameters": schema}}
                    for name, schema in SCHEMAS.items()])
NO_THINKING = {"enable_thinking": "false"}
SEEDS = [1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def marker_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("markers") / "tiny-markers", markers=True)


@pytest.fixture(scope="module")
def token_ids(marker_model):
    tokenizer = Tokenizer.from_file(str(marker_model / "tokenizer.json"))
    return {m: tokenizer.token_to_id(m) for m in
            ("<think>", "</think>", "<tool_call>", "</tool_call>", "b")}


@pytest.fixture
def loaded(server, marker_model):
    server.load(marker_model)
    return server


def chat_request(tool_choice, seed=1, tools=TOOLS, metadata=NO_THINKING, **fields):
    fields.setdefault("Tokens", 300)
    fields.setdefault("Temperature", 0.8)
    return backend_pb2.PredictOptions(
        Messages=[M(role="user", content="Weather in Paris? Or book a table.")],
        UseTokenizerTemplate=True, Tools=tools, ToolChoice=tool_choice, Seed=seed,
        Metadata=metadata, **fields)


def the_call(reply):
    """The single tool call of a Predict reply, checked against its schema."""
    (delta,) = reply.chat_deltas
    assert len(delta.tool_calls) == 1, (reply.message, delta)
    (call,) = delta.tool_calls
    assert call.name in SCHEMAS
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert "<tool_call>" not in delta.content and delta.content.strip() == ""
    return call


def stream_calls(chunks):
    return [(t.name, t.arguments) for c in chunks for d in c.chat_deltas for t in d.tool_calls]


def status_of(stub, request):
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=120)
    return info.value.code(), info.value.details()


# ---- required / named ------------------------------------------------------

@pytest.mark.parametrize("choice", ["required", '"required"', '{"type": "required"}'])
def test_required_always_calls_one_tool_with_valid_arguments(loaded, choice):
    for seed in SEEDS:
        call = the_call(loaded.stub.Predict(chat_request(choice, seed), timeout=120))
        assert call.id and call.index == 0


def test_required_lets_the_model_pick_either_tool(loaded, token_ids):
    """The random model prefers get_weather; pushing up the token for "b"
    (book_table's first letter) shows the grammar offers both tools."""
    bias = json.dumps({str(token_ids["b"]): 8})
    names = {the_call(loaded.stub.Predict(chat_request("required", seed), timeout=120)).name
             for seed in SEEDS[:2]}
    names |= {the_call(loaded.stub.Predict(chat_request("required", seed, LogitBias=bias),
                                           timeout=120)).name for seed in SEEDS[:3]}
    assert names == set(SCHEMAS)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("form", ['{{"type": "function", "function": {{"name": "{}"}}}}',
                                  '{{"name": "{}"}}'])
def test_named_function_is_called_with_valid_arguments(loaded, name, form):
    for seed in SEEDS[:4]:
        call = the_call(loaded.stub.Predict(chat_request(form.format(name), seed), timeout=120))
        assert call.name == name


def test_stream_gives_the_same_call(loaded):
    for choice in ("required", '{"type": "function", "function": {"name": "book_table"}}'):
        for seed in SEEDS[:3]:
            reply = loaded.stub.Predict(chat_request(choice, seed), timeout=120)
            call = the_call(reply)
            chunks = list(loaded.stub.PredictStream(chat_request(choice, seed), timeout=120))
            assert stream_calls(chunks) == [(call.name, call.arguments)]
            assert b"".join(c.message for c in chunks) == reply.message
            assert b"<tool_call>" not in reply.message


def test_a_thinking_model_may_think_before_the_call(loaded, token_ids):
    """Without enable_thinking:false an optional <think>...</think> block may
    come first (pushed here by a bias, kept short by another)."""
    bias = json.dumps({str(token_ids["<think>"]): 30, str(token_ids["</think>"]): 4})
    thought = 0
    for seed in SEEDS[:4]:
        reply = loaded.stub.Predict(chat_request("required", seed, metadata={},
                                                 LogitBias=bias), timeout=120)
        call = the_call(reply)
        thought += bool(reply.chat_deltas[0].reasoning_content)
        assert call.name in SCHEMAS
    assert thought >= 1
    # With thinking off, the biased <think> token is masked: the call comes first.
    reply = loaded.stub.Predict(chat_request("required", 1, LogitBias=bias), timeout=120)
    the_call(reply)
    assert reply.chat_deltas[0].reasoning_content == ""


def test_a_prompt_that_opened_a_think_block_closes_it_first(loaded):
    prompt = ("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
              "<think>")
    for seed in SEEDS[:3]:
        reply = loaded.stub.Predict(backend_pb2.PredictOptions(
            Prompt=prompt, Tools=TOOLS, ToolChoice="required", Seed=seed, Temperature=0.8,
            Tokens=400), timeout=120)
        the_call(reply)


# ---- none ----------------------------------------------------------------------

def test_none_never_writes_a_tool_call(loaded, token_ids):
    """Even with the <tool_call> token pushed up by a logit bias of 50."""
    bias = json.dumps({str(token_ids["<tool_call>"]): 50})
    for seed in SEEDS:
        for stream in (False, True):
            request = chat_request("none", seed, LogitBias=bias, Tokens=60, metadata={})
            if stream:
                chunks = list(loaded.stub.PredictStream(request, timeout=120))
                text = b"".join(c.message for c in chunks)
                assert not stream_calls(chunks)
            else:
                reply = loaded.stub.Predict(request, timeout=120)
                text = reply.message
                (delta,) = reply.chat_deltas
                assert not delta.tool_calls and "<tool_call>" not in delta.content
            assert b"<tool_call>" not in text and b"tool_call" not in text
            assert len(text) > 0
    # The same bias without ToolChoice does write the marker: the grammar is what stops it.
    reply = loaded.stub.Predict(chat_request("auto", 1, LogitBias=bias, Tokens=60),
                                timeout=120)
    assert reply.chat_deltas[0].tool_calls or b"<tool_call>" in reply.message


def test_none_with_a_grammar_keeps_the_grammar(loaded):
    reply = loaded.stub.Predict(chat_request("none", Grammar='root ::= "yes" | "no"',
                                             Temperature=0), timeout=120)
    assert reply.message in (b"yes", b"no")


# ---- errors --------------------------------------------------------------------

@pytest.mark.parametrize("text, mode, name", [
    ("", "auto", ""), ("auto", "auto", ""), (" None ", "none", ""), ("required", "required", ""),
    ('"none"', "none", ""), ('{"type": "auto"}', "auto", ""),
    ('{"type": "function", "function": {"name": "f"}}', "function", "f"),
    ('{"function": {"name": "f"}}', "function", "f"), ('{"name": "f"}', "function", "f"),
    ('{"type": "function", "name": "f"}', "function", "f"),
    (json.dumps('{"type": "function", "function": {"name": "f"}}'), "function", "f"),
])
def test_tool_choice_forms(text, mode, name):
    from mlx_backend.tool_choice import parse_tool_choice

    assert parse_tool_choice(text) == parse_tool_choice(text)  # plain data
    choice = parse_tool_choice(text)
    assert (choice.mode, choice.name) == (mode, name)


@pytest.mark.parametrize("choice, tools, words", [
    ('{"type": "function", "function": {"name": "launch_rocket"}}', TOOLS,
     ["ToolChoice", "launch_rocket"]),
    ("required", "", ["ToolChoice", "Tools"]),
    ('{"type": "function", "function": {"name": "get_weather"}}', "", ["ToolChoice", "Tools"]),
    ('{"type": "function", "function": {', TOOLS, ["ToolChoice", "JSON"]),
    ("sometimes", TOOLS, ["ToolChoice", "sometimes"]),
    ('{"type": "function"}', TOOLS, ["ToolChoice"]),
    ("[1, 2]", TOOLS, ["ToolChoice"]),
])
def test_bad_tool_choice_is_invalid_argument(loaded, choice, tools, words):
    code, details = status_of(loaded.stub, chat_request(choice, tools=tools))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in details


def test_required_with_a_grammar_is_invalid_argument(loaded):
    code, details = status_of(loaded.stub, chat_request("required",
                                                        Grammar='root ::= "yes"'))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "ToolChoice" in details and "Grammar" in details


def test_a_tool_schema_the_grammar_cannot_enforce_is_invalid_argument(loaded):
    tools = json.dumps([{"type": "function", "function": {"name": "odd", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}}}}])
    code, details = status_of(loaded.stub, chat_request("required", tools=tools))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "odd" in details and "ToolChoice" in details


def test_unsupported_tool_call_format_is_failed_precondition(server, tmp_path, marker_model,
                                                             tiny_model):
    folder = build_tiny_model(tmp_path / "coder", markers=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tool_parser_type"] = "qwen3_coder"  # XML-style calls: no grammar for them
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    try:
        server.load(folder)
        for choice in ("required", '{"name": "get_weather"}'):
            code, details = status_of(server.stub, chat_request(choice))
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert "qwen3_coder" in details and "ToolChoice" in details
        # "none" only needs the start marker, which it knows.
        reply = server.stub.Predict(chat_request("none", Tokens=30), timeout=120)
        assert b"<tool_call>" not in reply.message
        # A model with no tool-call format at all: required cannot be enforced,
        # none has nothing to forbid.
        server.load(tiny_model)
        code, details = status_of(server.stub, chat_request("required"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "ToolChoice" in details
        assert server.stub.Predict(chat_request("none", Tokens=10), timeout=120).tokens > 0
    finally:
        server.load(marker_model)


# ---- batching --------------------------------------------------------------------

def test_a_tool_choice_request_batches_without_disturbing_others(loaded):
    prompts = ["Hello world", "The quick brown fox", "Paris is"]

    def plain(prompt):
        return loaded.stub.Predict(backend_pb2.PredictOptions(
            Prompt=prompt, Tokens=40, IgnoreEOS=True), timeout=120)

    solo = [plain(p).message for p in prompts]
    solo_call = loaded.stub.Predict(chat_request("required", 3), timeout=120)
    results = {}

    def run(key, fn):
        results[key] = fn()

    threads = [threading.Thread(target=run, args=(i, lambda p=p: plain(p)))
               for i, p in enumerate(prompts)]
    threads.append(threading.Thread(target=run, args=("call", lambda: loaded.stub.Predict(
        chat_request("required", 3), timeout=120))))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i].message for i in range(len(prompts))] == solo
    call = the_call(results["call"])
    assert (call.name, call.arguments) == (solo_call.chat_deltas[0].tool_calls[0].name,
                                           solo_call.chat_deltas[0].tool_calls[0].arguments)
