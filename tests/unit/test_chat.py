"""mlx_backend/chat.py: JSON fields parsed within limits, messages and tools
checked and turned into what chat templates take, prompts rendered and fitted
to a budget, and the system preamble found for a cache checkpoint."""

import json

import jinja2
import pytest

import backend_pb2
from mlx_backend import chat, request
from mlx_backend.errors import FailedPrecondition, InvalidArgument

M = backend_pb2.Message


def nested_array(depth: int) -> str:
    return "[" * depth + "]" * depth


def chat_options(**fields):
    fields.setdefault("Messages", [M(role="user", content="hi")])
    return backend_pb2.PredictOptions(UseTokenizerTemplate=True, Tokens=8, **fields)


def assert_invalid(loaded, opts, field):
    with pytest.raises(InvalidArgument) as info:
        request.build_request(opts, loaded)
    assert field in str(info.value), str(info.value)
    return str(info.value)


def _tool_calls_with_arguments(arguments: str) -> str:
    return json.dumps([{"id": "c1", "type": "function",
                        "function": {"name": "get_weather", "arguments": arguments}}])


def user_turns(*texts):
    return [{"role": "user", "content": t} for t in texts]


# ---- load_json / parse_json -----------------------------------------------------------------

def test_depth_limit_is_exact():
    ok = nested_array(chat.MAX_JSON_DEPTH)
    assert chat.parse_json(ok, "X", list)
    with pytest.raises(InvalidArgument, match="X is nested too deeply"):
        chat.parse_json(nested_array(chat.MAX_JSON_DEPTH + 1), "X", list)
    # Many siblings are not depth.
    assert len(chat.parse_json("[" + ",".join(["[[1]]"] * 5000) + "]", "X", list)) == 5000


def test_depth_counts_objects_and_arrays_alike():
    mixed = '{"a": [' * 32 + "1" + "]}" * 32  # 64 levels
    assert chat.load_json(mixed, "X")
    with pytest.raises(InvalidArgument, match="X is nested too deeply"):
        chat.load_json("[" + mixed + "]", "X")


def test_brackets_inside_strings_are_not_nesting():
    text = '["' + "[" * 500 + '"]'
    assert chat.load_json(text, "X") == ["[" * 500]


def test_oversized_and_non_standard_json_is_invalid_argument():
    with pytest.raises(InvalidArgument, match="Tools is too large"):
        chat.parse_json(" " * (chat.MAX_JSON_CHARS + 1), "Tools", list)
    for constant in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(InvalidArgument, match="Tools is not valid JSON"):
            chat.parse_json(f"[{constant}]", "Tools", list)


def test_load_json_leaves_not_json_to_the_caller():
    with pytest.raises(ValueError) as info:
        chat.load_json("root ::= x", "Grammar")
    assert not isinstance(info.value, InvalidArgument)
    with pytest.raises(ValueError):
        chat.load_json("[NaN]", "X")


@pytest.mark.parametrize("text, kind, message", [
    ("[1]", dict, "F must be a JSON object"),
    ('{"a": 1}', list, "F must be a JSON array"),
    ('"s"', list, "F must be a JSON array"),
    ("{", dict, "F is not valid JSON"),
    ("", None, "F is not valid JSON"),
])
def test_parse_json_names_the_field(text, kind, message):
    with pytest.raises(InvalidArgument, match=message):
        chat.parse_json(text, "F", kind)


def test_parse_json_returns_any_kind_when_none_is_asked():
    assert chat.parse_json("5", "F") == 5
    assert chat.parse_json('{"a": [1, "b"]}', "F", dict) == {"a": [1, "b"]}


# ---- parse_tools ----------------------------------------------------------------------------

def test_parse_tools():
    tools = chat.parse_tools('[{"type": "function", "function": {"name": "f"}}, {"x": 1}]')
    assert tools == [{"type": "function", "function": {"name": "f"}}, {"x": 1}]
    for text, message in [("[1]", r"Tools\[0\] must be a JSON object"),
                          ('[{}, {"function": []}]', r"Tools\[1\]\.function must be"),
                          ('{"a": 1}', "Tools must be a JSON array")]:
        with pytest.raises(InvalidArgument, match=message):
            chat.parse_tools(text)


# ---- messages_to_dicts ----------------------------------------------------------------------

def test_messages_become_template_dicts():
    out = chat.messages_to_dicts([
        M(role=" System ", content="Be brief."),
        M(role="USER", content="hi", name="ann"),
        M(role="assistant", content="", reasoning_content="thinking",
          tool_calls='[{"id": "c1", "type": "function", "function": '
                     '{"name": "f", "arguments": "{\\"x\\": [1, 2]}"}}]'),
        M(role="tool", content="42", tool_call_id="c1"),
    ])
    assert out == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": "", "reasoning_content": "thinking",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "f", "arguments": {"x": [1, 2]}}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]


def test_tool_call_arguments_that_are_not_json_or_already_objects_stay_as_sent():
    (out,) = chat.messages_to_dicts([M(role="assistant", tool_calls=(
        '[{"function": {"name": "f", "arguments": "not json"}},'
        ' {"function": {"name": "g", "arguments": {"y": 1}}},'
        ' {"function": {"name": "h"}}]'))])
    assert [c["function"].get("arguments") for c in out["tool_calls"]] == [
        "not json", {"y": 1}, None]


@pytest.mark.parametrize("role", ["robot", "", "user2"])
def test_unknown_roles_are_invalid_argument_naming_the_message(role):
    with pytest.raises(InvalidArgument, match=r"Messages\[1\]\.role"):
        chat.messages_to_dicts([M(role="user", content="a"), M(role=role, content="b")])


def test_every_known_role_is_accepted():
    out = chat.messages_to_dicts([M(role=r) for r in sorted(chat.ROLES)])
    assert [m["role"] for m in out] == sorted(chat.ROLES)


# ---- template_kwargs ------------------------------------------------------------------------

def test_template_kwargs():
    tools = [{"type": "function"}]
    assert chat.template_kwargs(None, {}) == {}
    assert chat.template_kwargs([], {}) == {}
    kwargs = chat.template_kwargs(tools, {
        "chat_template_kwargs": '{"custom": [1], "documents": ["d"], "enable_thinking": true}',
        "enable_thinking": "False", "reasoning_effort": "high", "other": "x"})
    assert kwargs == {"tools": tools, "custom": [1], "documents": ["d"],
                      "enable_thinking": False, "reasoning_effort": "high"}
    assert chat.template_kwargs(None, {"enable_thinking": " TRUE "}) == {"enable_thinking": True}
    assert chat.template_kwargs(None, {"enable_thinking": "yes"}) == {"enable_thinking": False}


@pytest.mark.parametrize("key", sorted(chat.RESERVED_TEMPLATE_KWARGS))
def test_reserved_template_kwargs_are_rejected(key):
    with pytest.raises(InvalidArgument,
                       match=f"Metadata.chat_template_kwargs may not set {key}$"):
        chat.template_kwargs(None, {"chat_template_kwargs": f'{{"{key}": 1, "ok": 2}}'})


# ---- the same checks, as the servicer meets them --------------------------------------------

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
def test_bad_shapes_are_invalid_argument_naming_the_field(marker_loaded, fields, fragment):
    assert_invalid(marker_loaded, chat_options(**fields), fragment)


def test_tool_call_arguments_that_are_not_json_stay_a_string(marker_loaded):
    req = request.build_request(chat_options(Messages=[
        M(role="user", content="hi"),
        M(role="assistant", content="", tool_calls=_tool_calls_with_arguments("not json"))]),
        marker_loaded)
    assert '"arguments": "not json"' in marker_loaded.tokenizer.decode(req.prompt_tokens)


# ---- parse_prompt ---------------------------------------------------------------------------

def test_parse_prompt_raw():
    prompt = chat.parse_prompt(backend_pb2.PredictOptions(Prompt="hi", Tools='[{"a": 1}]'))
    assert prompt == chat.PromptInput(prompt="hi", messages=None, kwargs={}, tools=[{"a": 1}])


def test_parse_prompt_chat():
    opts = backend_pb2.PredictOptions(
        UseTokenizerTemplate=True, Messages=[M(role="user", content="hi")],
        Tools='[{"a": 1}]', Metadata={"reasoning_effort": "low"})
    assert chat.uses_template(opts)
    assert chat.parse_prompt(opts) == chat.PromptInput(
        prompt="", messages=[{"role": "user", "content": "hi"}],
        kwargs={"tools": [{"a": 1}], "reasoning_effort": "low"}, tools=[{"a": 1}])


def test_messages_without_the_template_flag():
    messages = [M(role="user", content="hi")]
    only_messages = backend_pb2.PredictOptions(Messages=messages)
    assert chat.uses_template(only_messages)  # no Prompt: the template is the only way
    assert chat.parse_prompt(only_messages).messages == [{"role": "user", "content": "hi"}]
    both = backend_pb2.PredictOptions(Messages=messages, Prompt="raw")
    assert not chat.uses_template(both)  # LocalAI already rendered the prompt
    assert chat.parse_prompt(both) == chat.PromptInput(prompt="raw")


def test_empty_request_is_invalid_argument():
    for opts in (backend_pb2.PredictOptions(), backend_pb2.PredictOptions(
            UseTokenizerTemplate=True)):
        with pytest.raises(InvalidArgument, match="empty request"):
            chat.parse_prompt(opts)


# ---- render_chat ----------------------------------------------------------------------------

def test_render_chat_with_the_models_template(loaded):
    text = chat.render_chat(loaded.tokenizer, user_turns("hi"), {})
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    text = chat.render_chat(loaded.tokenizer, user_turns("hi"), {}, add_generation_prompt=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"


def test_template_that_returns_no_text_is_invalid_argument():
    class Odd:
        has_chat_template = True

        def apply_chat_template(self, *args, **kwargs):
            return [1, 2, 3]

    with pytest.raises(InvalidArgument, match="rendered a list"):
        chat.render_chat(Odd(), [{"role": "user", "content": "hi"}], {})


class Raising:
    has_chat_template = True

    def __init__(self, error):
        self.error = error

    def apply_chat_template(self, *args, **kwargs):
        raise self.error

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


def test_a_template_that_raises_is_invalid_argument():
    with pytest.raises(InvalidArgument,
                       match="the chat template rejected the messages: roles must alternate"):
        chat.render_chat(Raising(jinja2.TemplateError("roles must alternate")), [], {})


def test_a_template_error_without_a_message_is_named_by_its_type():
    with pytest.raises(InvalidArgument, match="rejected the messages: ZeroDivisionError$"):
        chat.render_chat(Raising(ZeroDivisionError()), [], {})


def test_a_model_without_a_template_is_failed_precondition():
    class NoTemplate:
        has_chat_template = False

    with pytest.raises(FailedPrecondition, match="no chat template"):
        chat.render_chat(NoTemplate(), user_turns("hi"), {})


# ---- prompt_tokens --------------------------------------------------------------------------

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello world!"},
                {"role": "assistant", "content": "How are you today?"},
                {"role": "user", "content": "I am fine, thank you."},
                {"role": "assistant", "content": "The quick brown fox."},
                {"role": "user", "content": "Paris is the capital of France."}]


def chat_tokens(tokenizer, messages):
    return tokenizer.encode(chat.render_chat(tokenizer, messages, {}), add_special_tokens=False)


def test_prompt_tokens_without_a_budget(loaded):
    tok = loaded.tokenizer
    prompt = chat.PromptInput(messages=CONVERSATION)
    assert chat.prompt_tokens(tok, prompt) == chat_tokens(tok, CONVERSATION)
    assert chat.prompt_tokens(tok, chat.PromptInput(prompt="Hello world")) == \
        tok.encode("Hello world")


def test_a_budget_drops_the_oldest_turns_after_the_system_prompt(loaded):
    tok = loaded.tokenizer
    full = chat_tokens(tok, CONVERSATION)
    without_first = chat_tokens(tok, CONVERSATION[:1] + CONVERSATION[3:])
    only_last = chat_tokens(tok, CONVERSATION[:1] + CONVERSATION[5:])
    assert len(only_last) < len(without_first) < len(full)
    prompt = chat.PromptInput(messages=CONVERSATION)
    assert chat.prompt_tokens(tok, prompt, budget=len(full)) == full
    assert chat.prompt_tokens(tok, prompt, budget=len(full) - 1) == without_first
    assert chat.prompt_tokens(tok, prompt, budget=len(without_first)) == without_first
    assert chat.prompt_tokens(tok, prompt, budget=len(without_first) - 1) == only_last
    # Nothing more can go: the system prompt and the last turn stay, over budget.
    assert chat.prompt_tokens(tok, prompt, budget=3) == only_last


def test_dropping_turns_always_leaves_a_user_turn_first(loaded):
    tok = loaded.tokenizer
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "tool", "content": "c"}, {"role": "user", "content": "d"}]
    tokens = chat.prompt_tokens(tok, chat.PromptInput(messages=messages), budget=1)
    assert tokens == chat_tokens(tok, messages[3:])


def test_a_raw_prompt_keeps_its_last_tokens(loaded):
    tok = loaded.tokenizer
    tokens = tok.encode("The quick brown fox jumps over the lazy dog.")
    prompt = chat.PromptInput(prompt="The quick brown fox jumps over the lazy dog.")
    assert chat.prompt_tokens(tok, prompt, budget=4) == tokens[-4:]
    assert chat.prompt_tokens(tok, prompt, budget=100) == tokens
    assert chat.prompt_tokens(tok, prompt, budget=0) == tokens  # no room at all: left whole


# ---- system_prefix_tokens -------------------------------------------------------------------

def test_system_prefix_is_the_system_turn(loaded):
    tok = loaded.tokenizer
    prompt = chat.PromptInput(messages=[{"role": "system", "content": "Be brief, fox."},
                                        {"role": "user", "content": "Hello world!"}])
    prefix = chat.system_prefix_tokens(tok, prompt)
    assert tok.decode(prefix) == "<|im_start|>system\nBe brief, fox.<|im_end|>\n<|im_start|>user\n"
    assert chat.prompt_tokens(tok, prompt)[:len(prefix)] == prefix


def test_no_system_prefix_without_a_preamble(loaded):
    assert chat.system_prefix_tokens(loaded.tokenizer,
                                     chat.PromptInput(messages=user_turns("hi"))) is None
    assert chat.system_prefix_tokens(loaded.tokenizer, chat.PromptInput(prompt="hi")) is None


def test_a_tool_list_alone_is_a_preamble(marker_loaded):
    tok = marker_loaded.tokenizer
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    prompt = chat.PromptInput(messages=user_turns("hi"), kwargs={"tools": tools}, tools=tools)
    prefix = chat.system_prefix_tokens(tok, prompt)
    assert tok.decode(prefix) == ('<|im_start|>system\nTools: [{"type": "function", "function": '
                                  '{"name": "get_weather"}}]<|im_end|>\n<|im_start|>user\n')
    assert chat.prompt_tokens(tok, prompt)[:len(prefix)] == prefix


def test_system_prefix_is_remembered_per_preamble(loaded, monkeypatch):
    tok = loaded.tokenizer
    renders = []
    original = tok.apply_chat_template

    def counting(*args, **kwargs):
        renders.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(tok, "apply_chat_template", counting)
    system = {"role": "system", "content": "Remember this preamble."}
    first = chat.system_prefix_tokens(
        tok, chat.PromptInput(messages=[system] + user_turns("Hello world!")))
    assert first is not None and len(renders) == 2  # two probe renderings
    again = chat.system_prefix_tokens(
        tok, chat.PromptInput(messages=[system] + user_turns("Something else entirely")))
    assert again == first and len(renders) == 2  # same preamble: no rendering at all
    other = chat.system_prefix_tokens(tok, chat.PromptInput(
        messages=[{"role": "system", "content": "Another preamble."}] + user_turns("x")))
    assert other != first and len(renders) == 4
    with_kwargs = chat.system_prefix_tokens(tok, chat.PromptInput(
        messages=[system] + user_turns("x"), kwargs={"custom": 1}))
    assert with_kwargs == first and len(renders) == 6  # other template switches: probed again


def test_a_template_that_rejects_the_probes_gives_no_prefix():
    tok = Raising(jinja2.TemplateError("needs two users"))
    prompt = chat.PromptInput(messages=[{"role": "system", "content": "s"}] + user_turns("u"))
    assert chat.system_prefix_tokens(tok, prompt) is None
