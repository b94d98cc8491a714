"""Prompt tokens for a request: the raw `Prompt`, or `Messages` rendered
through the model's chat template with tools and template switches."""

import collections
import dataclasses
import json
import weakref
from typing import List, Optional

from .errors import FailedPrecondition, InvalidArgument

ROLES = {"system", "user", "assistant", "tool", "developer", "function"}


# Limits for every JSON field of a request. Python's json module recurses
# once per level (a few thousand "[" raise RecursionError), and templates and
# grammar compilers recurse again on what it returns, so nesting is capped far
# below any of those; no real tool list, schema or call needs 64 levels. The
# size cap is well above any prompt a model can take.
MAX_JSON_DEPTH = 64
MAX_JSON_CHARS = 16 * 2**20


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed (JSON has no NaN or Infinity)")


def _nesting_exceeds(value, limit: int) -> bool:
    """Whether arrays/objects nest more than `limit` levels (iteratively)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, (dict, list)))
    return False


def load_json(text: str, field: str):
    """json.loads for a request field, within MAX_JSON_DEPTH and MAX_JSON_CHARS.

    Raises `InvalidArgument` naming `field` when a limit is exceeded, and
    `ValueError` when the text is not (strict) JSON: callers decide whether
    that is an error (`parse_json`) or means "not JSON" (a GBNF grammar, a
    tool call's arguments kept as a string).
    """
    if len(text) > MAX_JSON_CHARS:
        raise InvalidArgument(f"{field} is too large: {len(text)} characters, "
                              f"at most {MAX_JSON_CHARS}")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidArgument(
            f"{field} is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    # Fewer brackets than the limit cannot nest deeper than it: skip the walk.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH \
            and _nesting_exceeds(value, MAX_JSON_DEPTH):
        raise InvalidArgument(
            f"{field} is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    return value


def parse_json(text: str, field: str, kind=None):
    """Parse a JSON field of the request, naming the field when it is bad."""
    try:
        value = load_json(text, field)
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise InvalidArgument(f"{field} is not valid JSON: {err}") from None
    if kind is not None and not isinstance(value, kind):
        raise InvalidArgument(f"{field} must be a JSON {_KIND_NAMES.get(kind, kind.__name__)}")
    return value


_KIND_NAMES = {dict: "object", list: "array"}


def parse_tools(text: str) -> list:
    """`Tools`: a JSON array of objects (OpenAI tool definitions)."""
    tools = parse_json(text, "Tools", list)
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise InvalidArgument(f"Tools[{i}] must be a JSON object")
        if "function" in tool and not isinstance(tool["function"], dict):
            raise InvalidArgument(f"Tools[{i}].function must be a JSON object")
    return tools


def _tool_calls(text: str, index: int) -> list:
    field = f"Messages[{index}].tool_calls"
    calls = parse_json(text, field, list)
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise InvalidArgument(f"{field}[{j}]: each call needs a 'function' object")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"{field}[{j}].function.name must be a non-empty string")
        arguments = function.get("arguments")
        if isinstance(arguments, str):  # OpenAI sends a JSON string; templates want a dict
            try:
                function["arguments"] = load_json(arguments,
                                                  f"{field}[{j}].function.arguments")
            except ValueError:
                pass  # not JSON: the template gets the string as sent
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


# apply_chat_template's own parameters (transformers), which
# chat_template_kwargs must not reach: they would change what rendering
# returns (tokenize, return_dict), replace the template, or clash with the
# arguments given here. `documents` stays allowed: it is template data.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding",
    "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs"})


def template_kwargs(tools: Optional[list], metadata) -> dict:
    """Tools and LocalAI's Metadata switches, passed on to the chat template."""
    kwargs = {}
    if tools:
        kwargs["tools"] = tools
    if metadata.get("chat_template_kwargs"):
        extra = parse_json(metadata["chat_template_kwargs"],
                           "Metadata.chat_template_kwargs", dict)
        reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(extra))
        if reserved:
            raise InvalidArgument(f"Metadata.chat_template_kwargs may not set "
                                  f"{', '.join(reserved)}")
        kwargs.update(extra)
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
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as err:  # jinja2 raises TemplateError and anything the template raises
        raise InvalidArgument(f"the chat template rejected the messages: "
                              f"{str(err) or type(err).__name__}") from None
    if not isinstance(text, str):
        raise InvalidArgument(f"the chat template rendered a {type(text).__name__}, "
                              f"not text")
    return text


def uses_template(opts) -> bool:
    return bool(opts.Messages) and (opts.UseTokenizerTemplate or not opts.Prompt)


@dataclasses.dataclass
class PromptInput:
    """A request's prompt, parsed once: the messages and template switches a
    chat template renders (or a raw prompt), and the tools the response
    parser needs."""

    prompt: str = ""
    messages: Optional[List[dict]] = None  # None: a raw prompt
    kwargs: dict = dataclasses.field(default_factory=dict)
    tools: Optional[list] = None


def parse_prompt(opts) -> PromptInput:
    """The prompt fields of a PredictOptions, checked."""
    tools = parse_tools(opts.Tools) if opts.Tools else None
    if uses_template(opts):
        return PromptInput(messages=messages_to_dicts(opts.Messages),
                           kwargs=template_kwargs(tools, dict(opts.Metadata)), tools=tools)
    if not opts.Prompt:
        raise InvalidArgument("empty request: set Prompt, or Messages with "
                              "UseTokenizerTemplate")
    return PromptInput(prompt=opts.Prompt, tools=tools)


def _chat_tokens(tokenizer, messages: List[dict], kwargs: dict) -> List[int]:
    return tokenizer.encode(render_chat(tokenizer, messages, kwargs), add_special_tokens=False)


def prompt_tokens(tokenizer, prompt: PromptInput, budget: Optional[int] = None) -> List[int]:
    """Tokens to feed for a parsed prompt.

    With a `budget`, the oldest turns after the system prompt (or, for a raw
    prompt, the oldest tokens) are dropped until the prompt fits in it.
    """
    if prompt.messages is not None:
        messages = prompt.messages
        tokens = _chat_tokens(tokenizer, messages, prompt.kwargs)
        while budget is not None and len(tokens) > budget:
            messages = _drop_oldest_turn(messages)
            if messages is None:
                break
            tokens = _chat_tokens(tokenizer, messages, prompt.kwargs)
        return tokens
    tokens = tokenizer.encode(prompt.prompt)
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


# Preamble tokens found so far, per tokenizer: most conversations repeat a
# handful of system prompts, so the two probe renderings run once for each.
_PREFIXES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PREFIXES_PER_TOKENIZER = 64


def system_prefix_tokens(tokenizer, prompt: PromptInput) -> Optional[List[int]]:
    """Tokens of the preamble (system message, tool list) that every
    conversation with the same preamble starts with, for a cache checkpoint.

    Templates render the preamble differently alone than in context (and
    some refuse an empty conversation), so it is found as the common prefix
    of two renderings that differ only in the user's words.
    """
    messages = prompt.messages or []
    head = messages[:1] if messages and messages[0]["role"] in ("system", "developer") else []
    if not head and not prompt.tools:
        return None
    key = json.dumps([head, prompt.kwargs], sort_keys=True, default=str)
    known = _PREFIXES.setdefault(tokenizer, collections.OrderedDict())
    if key in known:
        known.move_to_end(key)
        return known[key]
    known[key] = prefix = _probe_prefix(tokenizer, head, prompt.kwargs)
    if len(known) > _PREFIXES_PER_TOKENIZER:
        known.popitem(last=False)
    return prefix


def _probe_prefix(tokenizer, head: List[dict], kwargs: dict) -> Optional[List[int]]:
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
