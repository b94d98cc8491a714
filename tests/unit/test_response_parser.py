"""mlx_backend/response_parser.py: generated text split into content,
reasoning and tool calls; a tool call the model wrote badly never raises and
comes back as content (`rejected_text`)."""

import json

import pytest

import backend_pb2
from mlx_backend.response_parser import ResponseParser

DEEP = 100_000  # json.loads raises RecursionError on this many levels


def nested_array(depth: int) -> str:
    return "[" * depth + "]" * depth


def parse(tok, text, tools=None, patch=None):
    parser = ResponseParser(tok, [], tools)
    if patch is not None:
        parser._tool_parser = patch
    content, _ = parser.feed(text)
    tail, _ = parser.finish()
    return content + tail, parser


def feed_all(parser, pieces):
    content = reasoning = ""
    for piece in pieces:
        c, r = parser.feed(piece)
        content, reasoning = content + c, reasoning + r
    c, r = parser.finish()
    return content + c, reasoning + r


# ---- reasoning and content ------------------------------------------------------------------

def test_reasoning_is_split_from_content(tok):
    parser = ResponseParser(tok, [])
    assert parser.enabled
    assert feed_all(parser, ["<think>pondering</think>The answer"]) == ("The answer",
                                                                        "pondering")


def test_markers_split_across_pieces(tok):
    parser = ResponseParser(tok, [])
    assert parser.feed("Hi <thi") == ("Hi ", "")  # a partial marker is held back
    assert parser.feed("nk>abc</th") == ("", "abc")
    assert parser.feed("ink>def") == ("def", "")
    assert parser.finish() == ("", "")


def test_a_partial_marker_that_never_completes_is_content(tok):
    parser = ResponseParser(tok, [])
    assert parser.feed("end <th") == ("end ", "")
    assert parser.finish() == ("<th", "")


def test_a_prompt_that_opens_the_thinking_block_starts_in_reasoning(tok):
    prompt = tok.encode("<|im_start|>assistant\n<think>")
    assert feed_all(ResponseParser(tok, prompt), ["hmm</think>ok"]) == ("ok", "hmm")
    closed = tok.encode("<|im_start|>assistant\n<think>x</think>")
    assert feed_all(ResponseParser(tok, closed), ["plain"]) == ("plain", "")


def test_reasoning_content_and_a_tool_call_together(tok):
    parser = ResponseParser(tok, [])
    content, reasoning = feed_all(parser, [
        "<think>need weather</think>Sure.<tool_",
        'call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'])
    assert (content, reasoning) == ("Sure.", "need weather")
    (call,) = parser.tool_calls()
    assert (call["index"], call["name"]) == (0, "get_weather")
    assert json.loads(call["arguments"]) == {"city": "Oslo"}
    assert parser.rejected_text() == ""


def test_a_model_without_markers_passes_text_through(loaded):
    parser = ResponseParser(loaded.tokenizer, [])
    assert not parser.enabled
    assert parser.feed("<think>x</think><tool_call>{}</tool_call>") == (
        "<think>x</think><tool_call>{}</tool_call>", "")
    assert parser.finish() == ("", "")
    assert parser.tool_calls() == [] and parser.rejected_text() == ""


# ---- malformed tool calls from the model ----------------------------------------------------

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


def test_arguments_keep_non_ascii_text(tok):
    _, parser = parse(tok, '<tool_call>{"name": "f", "arguments": {"city": "Z\u00fcrich"}}'
                           '</tool_call>')
    assert parser.tool_calls()[0]["arguments"] == '{"city": "Z\u00fcrich"}'


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


def test_the_tools_reach_the_parser(tok):
    seen = []

    def spy(text, tools=None):
        seen.append(tools)
        return {"name": "f", "arguments": {}}

    tools = [{"type": "function", "function": {"name": "f"}}]
    parse(tok, "<tool_call>x</tool_call>", tools=tools, patch=spy)[1].tool_calls()
    assert seen == [tools]


def test_model_without_tool_parser(tok):
    _, parser = parse(tok, "<tool_call>{}</tool_call>", patch=None)
    parser._tool_parser = None
    assert parser.tool_calls() == [] and parser.rejected_text() == "<tool_call>{}</tool_call>"
