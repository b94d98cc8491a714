"""Chat inputs reach the template; reasoning and tool calls come back parsed.

A grammar forces the tiny model (built with <think>/<tool_call> markers) to
write a known reply, so the parsing is checked on real generation."""

import json

import grpc
import pytest

import backend_pb2
from tiny_model import build_tiny_model

M = backend_pb2.Message
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
# Lark (llguidance) grammar: the markers are tokens of their own, referenced as <...>.
FORCED = (f'start: <think> "plan it" </think> "Calling now." <tool_call> {json.dumps(CALL)} '
          '</tool_call>')
TOOLS = json.dumps([{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}])


@pytest.fixture(scope="module")
def marker_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("markers") / "tiny-markers", markers=True)


@pytest.fixture(scope="module")
def loaded(server, marker_model):
    server.load(marker_model)
    return server


def chat_request(**fields):
    return backend_pb2.PredictOptions(
        Messages=[M(role="user", content="Weather in Paris?")], UseTokenizerTemplate=True,
        Tools=TOOLS, Tokens=200, **fields)


def test_reasoning_content_and_tool_calls_are_parsed(loaded):
    reply = loaded.stub.Predict(chat_request(Grammar=FORCED))
    assert reply.message == b"Calling now."
    (delta,) = reply.chat_deltas
    assert delta.content == "Calling now."
    assert delta.reasoning_content == "plan it"
    (call,) = delta.tool_calls
    assert call.name == "get_weather" and call.index == 0 and call.id
    assert json.loads(call.arguments) == {"city": "Paris"}


def test_stream_separates_reasoning_from_content(loaded):
    chunks = list(loaded.stub.PredictStream(chat_request(Grammar=FORCED)))
    reasoning = "".join(d.reasoning_content for c in chunks for d in c.chat_deltas)
    content = "".join(d.content for c in chunks for d in c.chat_deltas)
    assert reasoning == "plan it" and content == "Calling now."
    assert b"".join(c.message for c in chunks) == b"Calling now."
    assert not any(b"<" in c.message for c in chunks)
    (call,) = [t for d in chunks[-1].chat_deltas for t in d.tool_calls]
    assert call.name == "get_weather"


@pytest.mark.parametrize("body", ["1", '{"name": 7, "arguments": {}}', '{"arguments": {}}',
                                  '"just text"'])
def test_a_malformed_tool_call_comes_back_as_content(loaded, body):
    forced = f'start: "Calling." <tool_call> {json.dumps(body)} </tool_call>'
    reply = loaded.stub.Predict(chat_request(Grammar=forced))
    (delta,) = reply.chat_deltas
    assert not delta.tool_calls
    assert delta.content == reply.message.decode() == f"Calling.<tool_call>{body}</tool_call>"
    chunks = list(loaded.stub.PredictStream(chat_request(Grammar=forced)))
    assert b"".join(c.message for c in chunks) == reply.message
    assert not [t for c in chunks for d in c.chat_deltas for t in d.tool_calls]


def test_messages_fields_and_tools_reach_the_template(loaded):
    messages = [
        M(role="system", content="Be brief."),
        M(role="user", content="Weather?"),
        M(role="assistant", content="", tool_calls=json.dumps([{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}])),
        M(role="tool", content="sunny", tool_call_id="call_1", name="get_weather"),
    ]
    reply = loaded.stub.TokenizeString(backend_pb2.PredictOptions(
        Messages=messages, UseTokenizerTemplate=True, Tools=TOOLS))
    text = loaded.stub.Detokenize(backend_pb2.DetokenizeRequest(tokens=reply.tokens)).content
    assert '"name": "get_weather"' in text.split("<|im_end|>")[0]  # tools rendered
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in text
    assert "<|im_start|>tool\nsunny<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_chat_template_kwargs_reach_the_template(server, tmp_path):
    folder = build_tiny_model(tmp_path / "kwargs-model")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "|thinking={{ enable_thinking }}|effort={{ reasoning_effort }}|x={{ custom }}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    server.load(folder)
    reply = server.stub.TokenizeString(backend_pb2.PredictOptions(
        Messages=[M(role="user", content="hi")], UseTokenizerTemplate=True,
        Metadata={"enable_thinking": "false", "reasoning_effort": "low",
                  "chat_template_kwargs": json.dumps({"custom": 7})}))
    text = server.stub.Detokenize(backend_pb2.DetokenizeRequest(tokens=reply.tokens)).content
    assert text == "hi|thinking=False|effort=low|x=7"


def test_model_without_chat_template_is_a_clear_error(server, tmp_path):
    folder = build_tiny_model(tmp_path / "no-template")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    server.load(folder)
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Predict(backend_pb2.PredictOptions(
            Messages=[M(role="user", content="hi")], UseTokenizerTemplate=True))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "chat template" in info.value.details()
    assert server.stub.Predict(backend_pb2.PredictOptions(Prompt="hi", Tokens=2)).tokens >= 1
