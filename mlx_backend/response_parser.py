"""Split generated text into content, reasoning and tool calls.

The markers (`<think>`, `<tool_call>`, ...) and the tool-call parser come from
mlx-lm, which infers them from the model's vocabulary and chat template; its
text state machine strips them and holds back partial markers, so a stream
can hand out reasoning and content separately as they arrive.

Tool calls are parsed at the end, and never raise: a call the model wrote
badly (not parseable, no name, arguments that are neither an object nor a
string) is not returned by `tool_calls()`; its text, markers included, is
returned by `rejected_text()` so the caller can give it to the client as
content.
"""

import json
import logging
import uuid
from typing import List, Optional, Tuple

from mlx_lm.generate import TextStateMachine, make_text_state_machine

log = logging.getLogger(__name__)


class ResponseParser:
    def __init__(self, tokenizer, prompt_tokens: List[int], tools=None):
        self.enabled = bool(tokenizer.has_thinking or tokenizer.has_tool_calling)
        self._tool_parser = tokenizer.tool_parser
        self._tools = tools
        start, end = (getattr(tokenizer, "tool_call_start", None),
                      getattr(tokenizer, "tool_call_end", None))
        self._call_start = start if isinstance(start, str) else ""
        self._call_end = end if isinstance(end, str) else ""
        self._tool_texts: List[Tuple[str, bool]] = []  # (text, closed by its end marker)
        self._tool_buffer = ""
        self._calls: List[dict] = []
        self._rejected: List[str] = []
        self._parsed = 0  # how many of _tool_texts are in _calls / _rejected
        if not self.enabled:
            return
        initial = "normal"
        if tokenizer.has_thinking:
            # A template that opens the thinking block itself starts us in it.
            if tokenizer.rfind_think_start(prompt_tokens) > tokenizer.rfind_think_end(
                    prompt_tokens):
                initial = "reasoning"
        initial = tokenizer.response_initial_state or initial
        self._state = make_text_state_machine(tokenizer).make_state(initial)

    def feed(self, text: str) -> Tuple[str, str]:
        """Consume released text; return the (content, reasoning) it adds."""
        if not self.enabled:
            return text, ""
        self._state, segments = TextStateMachine.split(self._state, text)
        return self._sort(segments)

    def finish(self) -> Tuple[str, str]:
        """Flush text held back for a marker that never completed."""
        if not self.enabled:
            return "", ""
        self._state, flushed, current = TextStateMachine.flush(self._state)
        content, reasoning = self._sort([(current, flushed)])
        if self._tool_buffer:
            self._tool_texts.append((self._tool_buffer, False))
            self._tool_buffer = ""
        return content, reasoning

    def _sort(self, segments) -> Tuple[str, str]:
        content = reasoning = ""
        for i, (state, text) in enumerate(segments):
            if state == "reasoning":
                reasoning += text
            elif state == "tool":
                self._tool_buffer += text
                if i < len(segments) - 1:  # the call closed within this text
                    self._tool_texts.append((self._tool_buffer, True))
                    self._tool_buffer = ""
            elif state is not None:
                content += text
        return content, reasoning

    def tool_calls(self) -> List[dict]:
        """Well-formed calls as {index, id, name, arguments (a JSON string)}.

        Never raises. Call it after `finish()`; calling again returns the same
        calls (same ids), plus any completed since.
        """
        self._parse_new()
        return [dict(call) for call in self._calls]

    def rejected_text(self) -> str:
        """The text of every tool call that did not parse into well-formed
        calls, with its markers, in the order written ("" if none): meant to
        be appended to the content so the client loses nothing."""
        self._parse_new()
        return "".join(self._rejected)

    def _parse_new(self):
        for text, closed in self._tool_texts[self._parsed:]:
            calls = self._parse_one(text)
            if calls is None:
                self._rejected.append(self._call_start + text
                                      + (self._call_end if closed else ""))
                continue
            for call in calls:
                call["index"] = len(self._calls)
                self._calls.append(call)
        self._parsed = len(self._tool_texts)

    def _parse_one(self, text: str) -> Optional[List[dict]]:
        """The calls in one tool-call block, or None if any of it is malformed
        (a block is taken whole or not at all, so no text is lost or doubled)."""
        if self._tool_parser is None:
            return None
        try:
            parsed = self._tool_parser(text, self._tools)
        except Exception as err:  # parsers raise ValueError, and worse on odd input
            if self._tools is None or isinstance(err, ValueError):
                log.warning("could not parse a tool call (%s: %s): %r",
                            type(err).__name__, err, text[:200])
                return None
            try:  # a parser can trip over tool definitions it does not expect
                parsed = self._tool_parser(text, None)
            except Exception as err2:
                log.warning("could not parse a tool call (%s: %s): %r",
                            type(err2).__name__, err2, text[:200])
                return None
        items = parsed if isinstance(parsed, list) else [parsed]
        calls = [_well_formed(item) for item in items]
        if not calls or any(call is None for call in calls):
            log.warning("malformed tool call, returned as content: %r", text[:200])
            return None
        return calls


def _well_formed(call) -> Optional[dict]:
    """{id, name, arguments (a JSON string)} for a parser's call, or None
    unless its name is a non-empty string and its arguments an object (or
    already a string)."""
    if not isinstance(call, dict):
        return None
    name = call.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    if "arguments" in call:
        arguments = call["arguments"]
    else:  # Llama 3 writes "parameters"; no arguments at all is a call without any
        arguments = call.get("parameters", {})
    if isinstance(arguments, dict):
        try:  # strict JSON: no NaN/Infinity, no sets or bytes from a Python-style parser
            arguments = json.dumps(arguments, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            return None
    elif not isinstance(arguments, str):
        return None
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id:
        call_id = f"call_{uuid.uuid4().hex[:24]}"
    return {"index": 0, "id": call_id, "name": name, "arguments": arguments}
