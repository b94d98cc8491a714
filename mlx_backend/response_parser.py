"""Split generated text into content, reasoning and tool calls.

The markers (`<think>`, `<tool_call>`, ...) and the tool-call parser come from
mlx-lm, which infers them from the model's vocabulary and chat template; its
text state machine strips them and holds back partial markers, so a stream
can hand out reasoning and content separately as they arrive.
"""

import json
import logging
import uuid
from typing import List, Tuple

from mlx_lm.generate import TextStateMachine, make_text_state_machine

log = logging.getLogger(__name__)


class ResponseParser:
    def __init__(self, tokenizer, prompt_tokens: List[int], tools=None):
        self.enabled = bool(tokenizer.has_thinking or tokenizer.has_tool_calling)
        self._tool_parser = tokenizer.tool_parser
        self._tools = tools
        self._tool_texts: List[str] = []
        self._tool_buffer = ""
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
            self._tool_texts.append(self._tool_buffer)
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
                    self._tool_texts.append(self._tool_buffer)
                    self._tool_buffer = ""
            elif state is not None:
                content += text
        return content, reasoning

    def tool_calls(self) -> List[dict]:
        """Parsed calls as {index, id, name, arguments (a JSON string)}."""
        calls = []
        for text in self._tool_texts:
            try:
                parsed = self._tool_parser(text, self._tools)
            except ValueError as err:  # json.JSONDecodeError is a ValueError
                log.warning("could not parse a tool call (%s): %r", err, text[:200])
                continue
            for call in parsed if isinstance(parsed, list) else [parsed]:
                arguments = call.get("arguments", {})
                if not isinstance(arguments, str):
                    arguments = json.dumps(arguments, ensure_ascii=False)
                calls.append({"index": len(calls),
                              "id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                              "name": call.get("name", ""), "arguments": arguments})
        return calls
