"""`PredictOptions.ToolChoice` enforced with a grammar over the model's own
tool-call format.

LocalAI sends ToolChoice as a string: empty or `auto` (no constraint),
`none`, `required`, or a JSON object naming one function
(`{"type": "function", "function": {"name": "get_weather"}}`; the bare
`{"name": ...}` and `{"type": "function", "name": ...}` forms and a
JSON-encoded string such as `"\\"required\\""` are accepted too).

* `required` / a named function: decoding is constrained by a Lark grammar
  (llguidance) that writes exactly one call in the model's tool-call format,
  whose arguments follow the tool's `parameters` JSON schema, and then ends.
  Supported formats (mlx-lm's tool parser): `json_tools` (Hermes / Qwen 2.5 /
  Qwen 3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`).
  Any other parser is FAILED_PRECONDITION naming it: a grammar that the
  parser could not read back is never produced.
  Thinking (a tokenizer with think markers): when the prompt already opened
  a think block, the reply first closes it; otherwise an optional
  `<think>...</think>` block may come first, unless the request turned
  thinking off (`enable_thinking: false` in Metadata or
  chat_template_kwargs), in which case the reply starts with the call.
  Whitespace (at most 4 spaces or newlines) may separate the think block
  from the call; no other text is allowed around the call.
* `none`: the reply may be any text (and any special token, the think
  markers included) except the tool-call markers (start and end), neither
  as their own token nor spelled out in pieces of text. A model without a
  tool-call format needs nothing enforced.

A user `Grammar` with `required` / a named function is INVALID_ARGUMENT (two
grammars over one reply cannot be combined in general); with `none` the
user's grammar is used as sent (an llguidance grammar emits a marker token
only where it names it).

Compiled grammars are cached per tokenizer (weakly) and shared between
requests; each request still gets its own matcher (`GrammarSpec.processor`),
so a constrained request batches with any others.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

from . import chat
from .errors import FailedPrecondition, InvalidArgument

__all__ = ["ToolChoice", "parse_tool_choice", "tool_choice_grammar", "tool_functions",
           "SUPPORTED_FORMATS", "MAX_GAP"]

AUTO, NONE, REQUIRED, FUNCTION = "auto", "none", "required", "function"
_MODES = {"": AUTO, "auto": AUTO, "none": NONE, "required": REQUIRED,
          "any": REQUIRED}  # "any": Anthropic's / Mistral's name for required

# mlx-lm tool parsers (mlx_lm/tool_parsers/<name>.py) a grammar can target.
SUPPORTED_FORMATS = ("json_tools",)

MAX_GAP = 4  # whitespace characters allowed between the think block and the call
_CACHE_PER_TOKENIZER = 64
_FIELD = "ToolChoice"


@dataclasses.dataclass(frozen=True)
class ToolChoice:
    mode: str = AUTO  # "auto", "none", "required" or "function"
    name: str = ""    # the function, when mode is "function"

    @property
    def constrains(self) -> bool:
        return self.mode != AUTO

    def describe(self) -> str:
        return f"function {self.name!r}" if self.mode == FUNCTION else repr(self.mode)


# ---- parsing -------------------------------------------------------------

def _usage(got: str) -> InvalidArgument:
    return InvalidArgument(
        f"ToolChoice must be \"auto\", \"none\", \"required\" or a JSON object naming a "
        f"function ({{\"type\": \"function\", \"function\": {{\"name\": \"...\"}}}}); "
        f"got {got}")


def _from_object(value: dict) -> ToolChoice:
    kind = value.get("type")
    if kind is not None and not isinstance(kind, str):
        raise _usage("a \"type\" that is not a string")
    function = value.get("function")
    if function is not None and not isinstance(function, dict):
        raise _usage("a \"function\" that is not a JSON object")
    name = (function or {}).get("name", value.get("name"))
    if name is None and kind is not None and kind.strip().lower() in _MODES:
        return ToolChoice(_MODES[kind.strip().lower()])  # {"type": "required"}
    if kind is not None and kind not in ("function", "tool"):
        raise _usage(f"type {kind[:50]!r}")
    if not isinstance(name, str) or not name:
        raise _usage("an object without a function name")
    return ToolChoice(FUNCTION, name)


def parse_tool_choice(text: str) -> ToolChoice:
    """LocalAI's ToolChoice field; `InvalidArgument` naming ToolChoice when bad."""
    text = (text or "").strip()
    if text[:1] in ("{", "\"", "["):
        value = chat.parse_json(text, _FIELD)  # InvalidArgument "ToolChoice is not valid JSON"
        if isinstance(value, dict):
            return _from_object(value)
        if isinstance(value, str) and value.strip().lower() in _MODES:
            return ToolChoice(_MODES[value.strip().lower()])
        if isinstance(value, str) and value.strip()[:1] == "{":
            return parse_tool_choice(value)  # an object JSON-encoded once more
        raise _usage(f"the JSON {type(value).__name__} {text[:50]!r}")
    mode = _MODES.get(text.lower())
    if mode is None:
        raise _usage(repr(text[:50]))
    return ToolChoice(mode)


# ---- tools ---------------------------------------------------------------

_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def _parameters(index: int, name: str, params) -> dict:
    """The arguments schema of one tool, made to describe a JSON object
    (the tool parser only reads calls whose arguments are an object)."""
    where = f"Tools[{index}] ({name})"
    if params is None or params == {}:
        return dict(_NO_PARAMETERS)  # OpenAI: no parameters means an empty argument list
    if not isinstance(params, dict):
        raise InvalidArgument(f"{where}: parameters must be a JSON schema object")
    kind = params.get("type")
    if kind is None:
        params = {**params, "type": "object"}
    elif kind != "object":
        if isinstance(kind, list) and "object" in kind:
            params = {**params, "type": "object"}
        else:
            raise InvalidArgument(f"{where}: parameters must describe a JSON object, "
                                  f"not {json.dumps(kind)[:50]}")
    return params


def tool_functions(tools: Optional[list]) -> List[Tuple[str, dict]]:
    """(name, arguments schema) of every function tool, first of each name.

    Accepts OpenAI's `{"type": "function", "function": {...}}` and the bare
    `{"name": ..., "parameters": ...}`; tools of another type are skipped.
    """
    out: Dict[str, dict] = {}
    for i, tool in enumerate(tools or ()):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            continue
        function = tool.get("function", tool)
        if not isinstance(function, dict):
            continue
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"Tools[{i}] has no function name (ToolChoice needs one "
                                  f"for every function tool)")
        if name not in out:
            out[name] = _parameters(i, name, function.get("parameters"))
    return list(out.items())


def _select(choice: ToolChoice, tools: Optional[list]) -> List[Tuple[str, dict]]:
    functions = tool_functions(tools)
    if not functions:
        raise InvalidArgument(f"ToolChoice {choice.describe()} needs Tools: the request "
                              f"lists no function to call")
    if choice.mode == FUNCTION:
        chosen = [(n, p) for n, p in functions if n == choice.name]
        if not chosen:
            known = ", ".join(repr(n) for n, _ in functions[:20])
            raise InvalidArgument(f"ToolChoice names function {choice.name[:100]!r}, which "
                                  f"is not in Tools (functions: {known})")
        return chosen
    return functions


# ---- per-tokenizer facts and caches ---------------------------------------

class _TokenizerFacts:
    def __init__(self):
        self.lock = threading.Lock()
        self.specials: Optional[List[int]] = None
        self.grammars: "collections.OrderedDict" = collections.OrderedDict()


_FACTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_FACTS_LOCK = threading.Lock()


def _facts(tokenizer) -> _TokenizerFacts:
    with _FACTS_LOCK:
        try:
            facts = _FACTS.get(tokenizer)
            if facts is None:
                facts = _FACTS[tokenizer] = _TokenizerFacts()
        except TypeError:  # not weak-referenceable: nothing cached
            facts = _TokenizerFacts()
        return facts


def _special_ids(tokenizer, lltok, facts: _TokenizerFacts) -> List[int]:
    """Token ids llguidance treats as special (added tokens: not text)."""
    if facts.specials is None:
        facts.specials = [i for i in range(lltok.vocab_size) if lltok.is_special_token(i)]
    return facts.specials


# ---- grammar pieces -------------------------------------------------------

def _pieces(text: str, tokenizer, lltok) -> List[Tuple[str, object]]:
    """A marker as ("special", id) and ("text", str) pieces, the way the
    tokenizer writes it (a marker is usually one added token)."""
    ids = [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    if b"".join(lltok.decode_bytes([t]) for t in ids) != text.encode("utf-8"):
        return [("text", text)]  # the tokenizer does not reproduce it: match it as text
    pieces: List[Tuple[str, object]] = []
    pending = b""
    for token in ids:
        if lltok.is_special_token(token):
            if pending:
                pieces.append(("text", pending.decode("utf-8")))
                pending = b""
            pieces.append(("special", token))
        else:
            pending += lltok.decode_bytes([token])
    if pending:
        pieces.append(("text", pending.decode("utf-8")))
    return pieces


def _lark_marker(pieces) -> str:
    return " ".join(f"<[{value}]>" if kind == "special" else json.dumps(value)
                    for kind, value in pieces)


def _regex_literal(text: str) -> str:
    """`text` as a regex (inside /.../) matching exactly it."""
    return "".join(c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):X}}}" for c in text)


def _text_without(strings: Sequence[str]) -> str:
    """A Lark terminal body: any text that contains none of `strings`."""
    strings = sorted({s for s in strings if s})
    if not strings:
        return "/(?s:.*)/"
    alternatives = "|".join(_regex_literal(s) for s in strings)
    return f"/(?s:.*)/ & ~/(?s:.*)(?:{alternatives})(?s:.*)/"


def _ranges(ids: Sequence[int]) -> str:
    ids = sorted(set(ids))
    parts = []
    start = prev = None
    for i in ids:
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = i
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(parts)


def _format_name(tokenizer) -> str:
    parser = getattr(tokenizer, "tool_parser", None)
    module = getattr(parser, "__module__", "") or ""
    if module.startswith("mlx_lm.tool_parsers."):
        return module.rsplit(".", 1)[-1]
    return module or repr(parser)


def _call_start_markers(tokenizer) -> List[str]:
    """Every marker after which mlx-lm's response parser reads a tool call."""
    targets = set()
    markers = []
    for edges in (getattr(tokenizer, "response_transitions", None) or {}).values():
        for marker, destination in edges:
            targets.add(destination)
            if destination == "tool" and marker:
                markers.append(marker)
    if "tool" not in targets and tokenizer.tool_call_start:
        markers.append(tokenizer.tool_call_start)
    return markers


def _thinking_disabled(template_kwargs: Optional[dict]) -> bool:
    for key in ("enable_thinking", "thinking"):
        value = (template_kwargs or {}).get(key)
        if isinstance(value, str):
            value = value.strip().lower() not in ("false", "0", "no", "off", "")
            return not value
        if value is not None:
            return not value
    return False


def _think_state(tokenizer, prompt_tokens: Sequence[int], template_kwargs) -> str:
    """"open" (the prompt opened a think block), "optional" or "off"."""
    if not getattr(tokenizer, "has_thinking", False):
        return "off"
    if tokenizer.response_initial_state == "reasoning":
        return "open"
    if tokenizer.rfind_think_start(prompt_tokens) > tokenizer.rfind_think_end(prompt_tokens):
        return "open"
    return "off" if _thinking_disabled(template_kwargs) else "optional"


# ---- the grammars ---------------------------------------------------------

def _json_tools_call(functions, tokenizer, lltok) -> List[str]:
    """Rules for one Hermes-style call: <tool_call>{"name": N, "arguments": A}</tool_call>."""
    from .grammar import JSON_DEFAULTS

    start = _lark_marker(_pieces(tokenizer.tool_call_start, tokenizer, lltok))
    end = _lark_marker(_pieces(tokenizer.tool_call_end, tokenizer, lltok))
    rules = [f"call: {start} NL? call_body NL? {end}",
             "call_body: " + " | ".join(f"fn_{i}" for i in range(len(functions))),
             'NL: "\\n"']
    for i, (name, params) in enumerate(functions):
        head = '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
        schema = dict(params)
        own = params.get("x-guidance")
        schema["x-guidance"] = {**JSON_DEFAULTS, **(own if isinstance(own, dict) else {})}
        rules.append(f"fn_{i}: {json.dumps(head)} args_{i} \"}}\"")
        rules.append(f"args_{i}: %json {json.dumps(schema)}")
    return rules


def _think_rules(state: str, tokenizer, lltok, avoid: Sequence[str]) -> Tuple[str, List[str]]:
    """(prefix expression, rules) for the thinking that may precede a call."""
    if state == "off":
        return "", []
    think_end = _lark_marker(_pieces(tokenizer.think_end, tokenizer, lltok))
    rules = [f"THINK: {_text_without([tokenizer.think_end, *avoid])}",
             f"GAP: /[ \\n]{{1,{MAX_GAP}}}/"]
    if state == "open":
        return f"THINK {think_end} GAP?", rules
    think_start = _lark_marker(_pieces(tokenizer.think_start, tokenizer, lltok))
    return f"({think_start} THINK {think_end} GAP?)?", rules


def _call_grammar(choice, functions, tokenizer, lltok, think: str) -> str:
    fmt = _format_name(tokenizer)
    if fmt not in SUPPORTED_FORMATS or tokenizer.response_transitions:
        raise FailedPrecondition(
            f"ToolChoice {choice.describe()} cannot be enforced for this model: its tool-call "
            f"format {fmt!r} has no grammar here (supported: {', '.join(SUPPORTED_FORMATS)}); "
            f"send ToolChoice \"auto\" instead")
    prefix, rules = _think_rules(think, tokenizer, lltok, _call_start_markers(tokenizer))
    call_rules = _json_tools_call(functions, tokenizer, lltok)
    start = f"start: {prefix} call" if prefix else "start: call"
    return "\n".join([start, *call_rules, *rules]) + "\n"


def _none_grammar(tokenizer, lltok, facts) -> str:
    """Any text and special tokens, but never a tool-call marker: no start
    marker (which would open a call), and no stray end marker either."""
    banned_ids = set(int(i) for i in (tokenizer.eos_token_ids or ()))
    texts = []
    starts = _call_start_markers(tokenizer)
    end = tokenizer.tool_call_end
    for marker in starts + ([end] if end and end not in starts else []):
        pieces = _pieces(marker, tokenizer, lltok)
        if len(pieces) == 1 and pieces[0][0] == "special":
            banned_ids.add(pieces[0][1])
            texts.append(marker)  # and the same characters spelled out as text
        elif all(kind == "text" for kind, _ in pieces):
            texts.append(marker)
        elif marker in starts:
            raise FailedPrecondition(
                f"ToolChoice \"none\" cannot be enforced for this model: its tool-call marker "
                f"{marker!r} mixes special tokens and text; send ToolChoice \"auto\" instead")
    allowed = [i for i in _special_ids(tokenizer, lltok, facts) if i not in banned_ids]
    rules = [f"TEXT: {_text_without(texts)}"]
    if allowed:
        rules.insert(0, f"special: <[{_ranges(allowed)}]>")
        start = "start: TEXT (special TEXT)*"
    else:
        start = "start: TEXT"
    return "\n".join([start, *rules]) + "\n"


def tool_choice_grammar(choice: ToolChoice, tools: Optional[list], tokenizer,
                        prompt_tokens: Sequence[int], *, user_grammar: str = "",
                        template_kwargs: Optional[dict] = None):
    """The compiled grammar (`grammar.GrammarSpec`) that enforces `choice`,
    or None when nothing needs enforcing.

    Raises InvalidArgument for a choice the request cannot have (no Tools,
    an unknown function, a user Grammar beside required/named, a tool
    schema llguidance rejects) and FailedPrecondition when the model's
    tool-call format has no grammar here.
    """
    from .grammar import compile_grammar, compile_lark, llg_tokenizer

    if choice.mode == AUTO:
        return compile_grammar(user_grammar, tokenizer) if user_grammar.strip() else None
    if choice.mode == NONE:
        if user_grammar.strip():
            return compile_grammar(user_grammar, tokenizer)
        if not getattr(tokenizer, "has_tool_calling", False):
            return None  # no tool-call format: the reply cannot contain a call
        key: tuple = (NONE,)
        build = lambda lltok, facts: _none_grammar(tokenizer, lltok, facts)  # noqa: E731
    else:
        if user_grammar.strip():
            raise InvalidArgument(
                f"ToolChoice {choice.describe()} cannot be combined with a Grammar: the "
                f"tool-call grammar already constrains the whole reply; send one or the other")
        functions = _select(choice, tools)
        if not getattr(tokenizer, "has_tool_calling", False):
            raise FailedPrecondition(
                f"ToolChoice {choice.describe()} cannot be enforced: the loaded model has no "
                f"tool-call format that mlx-lm recognises")
        think = _think_state(tokenizer, prompt_tokens, template_kwargs)
        key = (choice.mode, think, json.dumps(functions, sort_keys=True))
        build = lambda lltok, facts: _call_grammar(  # noqa: E731
            choice, functions, tokenizer, lltok, think)
    key += (tuple(sorted(int(i) for i in (tokenizer.eos_token_ids or ()))),)
    facts = _facts(tokenizer)
    with facts.lock:
        spec = facts.grammars.get(key)
        if spec is not None:
            facts.grammars.move_to_end(key)
            return spec
    lltok = llg_tokenizer(tokenizer)
    text = build(lltok, facts)
    if choice.mode != NONE:
        _check_schemas(functions)
    spec = compile_lark(text, tokenizer, kind="tool_choice",
                        what=f"ToolChoice {choice.describe()}: the tool-call grammar")
    with facts.lock:
        facts.grammars[key] = spec
        while len(facts.grammars) > _CACHE_PER_TOKENIZER:
            facts.grammars.popitem(last=False)
    return spec


def _check_schemas(functions):
    """Each tool's schema alone, so an error names the tool it is in."""
    import llguidance

    from .grammar import JSON_DEFAULTS, _short

    for name, params in functions:
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                params, defaults=JSON_DEFAULTS)
            error = llguidance.LLMatcher.validate_grammar(grammar)
        except Exception as err:  # ValueError/TypeError; a deep schema, RecursionError
            error = str(err) or type(err).__name__
        if error and not error.startswith("WARNING"):
            raise InvalidArgument(f"ToolChoice: the parameters schema of tool {name!r} "
                                  f"cannot be enforced: {_short(error)}")
