"""Prompt tokens for a request: the raw `Prompt`, or `Messages` rendered
through the model's chat template with tools and template switches."""

import json
from typing import List, Optional

from .errors import FailedPrecondition, InvalidArgument

ROLES = {"system", "user", "assistant", "tool", "developer", "function"}


def parse_json(text: str, field: str, kind=None):
    """Parse a JSON field of the request, naming the field when it is bad."""
    try:
        value = json.loads(text)
    except ValueError as err:
        raise InvalidArgument(f"{field} is not valid JSON: {err}") from None
    if kind is not None and not isinstance(value, kind):
        raise InvalidArgument(f"{field} must be a JSON {kind.__name__}")
    return value


def _tool_calls(text: str, index: int) -> list:
    calls = parse_json(text, f"Messages[{index}].tool_calls", list)
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise InvalidArgument(
                f"Messages[{index}].tool_calls: each call needs a 'function' object")
        arguments = function.get("arguments")
        if isinstance(arguments, str):  # OpenAI sends a JSON string; templates want a dict
            try:
                function["arguments"] = json.loads(arguments)
            except ValueError:
                pass
    return calls


def messages_to_dicts(messages) -> List[dict]:
    """Protobuf `Message`s to the dicts chat templates expect."""
    out = []
    for i, m in enumerate(messages):
        role = m.role.strip().lower()
        if role not in ROLES:
            raise InvalidArgument(f"Messages[{i}].role {m.role!r} is not one of "
                                  f"{', '.join(sorted(ROLES))}")
        item = {"role": role, "content": m.content}
        if m.name:
            item["name"] = m.name
        if m.tool_call_id:
            item["tool_call_id"] = m.tool_call_id
        if m.reasoning_content:
            item["reasoning_content"] = m.reasoning_content
        if m.tool_calls:
            item["tool_calls"] = _tool_calls(m.tool_calls, i)
        out.append(item)
    return out


def template_kwargs(tools: str, metadata) -> dict:
    """Tools and LocalAI's Metadata switches, passed on to the chat template."""
    kwargs = {}
    if tools:
        kwargs["tools"] = parse_json(tools, "Tools", list)
    if metadata.get("chat_template_kwargs"):
        kwargs.update(parse_json(metadata["chat_template_kwargs"],
                                 "Metadata.chat_template_kwargs", dict))
    if "enable_thinking" in metadata:
        kwargs["enable_thinking"] = metadata["enable_thinking"].strip().lower() == "true"
    if metadata.get("reasoning_effort"):
        kwargs["reasoning_effort"] = metadata["reasoning_effort"]
    return kwargs


def render_chat(tokenizer, messages: List[dict], kwargs: dict,
                add_generation_prompt: bool = True) -> str:
    if not getattr(tokenizer, "has_chat_template", False):
        raise FailedPrecondition(
            "the loaded model has no chat template: send a raw Prompt instead of "
            "Messages, or load a model whose tokenizer_config.json has a chat_template")
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as err:  # jinja2 raises TemplateError and anything the template raises
        raise InvalidArgument(f"the chat template rejected the messages: {err}") from None


def uses_template(opts) -> bool:
    return bool(opts.Messages) and (opts.UseTokenizerTemplate or not opts.Prompt)


def _chat_tokens(tokenizer, messages: List[dict], kwargs: dict) -> List[int]:
    return tokenizer.encode(render_chat(tokenizer, messages, kwargs), add_special_tokens=False)


def prompt_tokens(tokenizer, opts, budget: Optional[int] = None) -> List[int]:
    """Tokens to feed for a PredictOptions-like request.

    With a `budget`, the oldest turns after the system prompt (or, for a raw
    prompt, the oldest tokens) are dropped until the prompt fits in it.
    """
    if uses_template(opts):
        messages = messages_to_dicts(opts.Messages)
        kwargs = template_kwargs(opts.Tools, dict(opts.Metadata))
        tokens = _chat_tokens(tokenizer, messages, kwargs)
        while budget is not None and len(tokens) > budget:
            messages = _drop_oldest_turn(messages)
            if messages is None:
                break
            tokens = _chat_tokens(tokenizer, messages, kwargs)
        return tokens
    if opts.Tools:
        parse_json(opts.Tools, "Tools", list)
    if not opts.Prompt:
        raise InvalidArgument("empty request: set Prompt, or Messages with "
                              "UseTokenizerTemplate")
    tokens = tokenizer.encode(opts.Prompt)
    if budget is not None and len(tokens) > budget > 0:
        tokens = tokens[len(tokens) - budget:]
    return tokens


def _drop_oldest_turn(messages: List[dict]) -> Optional[List[dict]]:
    """Messages without the oldest exchange after the system prompt, so that
    the conversation still starts with a user turn; None if nothing can go."""
    head = 1 if messages and messages[0]["role"] in ("system", "developer") else 0
    rest = messages[head:]
    if len(rest) <= 1:
        return None
    rest = rest[1:]
    while len(rest) > 1 and rest[0]["role"] != "user":
        rest = rest[1:]
    return messages[:head] + rest


def system_prefix_tokens(tokenizer, opts) -> Optional[List[int]]:
    """Tokens of the preamble (system message, tool list) that every
    conversation with the same preamble starts with, for a cache checkpoint.

    Templates render the preamble differently alone than in context (and
    some refuse an empty conversation), so it is found as the common prefix
    of two renderings that differ only in the user's words.
    """
    messages = messages_to_dicts(opts.Messages)
    head = messages[:1] if messages and messages[0]["role"] in ("system", "developer") else []
    if not head and not opts.Tools:
        return None
    kwargs = template_kwargs(opts.Tools, dict(opts.Metadata))
    try:
        first, second = (_chat_tokens(tokenizer, head + [{"role": "user", "content": probe}],
                                      kwargs) for probe in ("a", "b"))
    except InvalidArgument:
        return None
    if first == second:  # the probes did not survive tokenization
        return None
    common = 0
    for a, b in zip(first, second):
        if a != b:
            break
        common += 1
    return first[:common] or None
