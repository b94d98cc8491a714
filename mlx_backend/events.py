"""What the engine tells a waiting gRPC handler, and the handle it waits on.

A request's life is zero or more `Delta`s, then one `Done` or one `Failed`.
The handler iterates a `RequestHandle`; it never touches MLX and never waits
on an engine that has failed.
"""

import dataclasses
import queue
import threading
from typing import Callable, List, Optional

from . import faults
from .errors import BackendError, Unavailable
from .request import GenerationRequest

@dataclasses.dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    prompt_ms: float = 0.0
    generation_ms: float = 0.0


@dataclasses.dataclass
class Delta:
    text: str  # content, without reasoning or tool-call markup
    reasoning: str
    structured: bool  # the model has reasoning / tool-call markers
    usage: Usage


@dataclasses.dataclass
class Done:
    text: str  # the whole content
    reasoning: str
    tool_calls: List[dict]
    structured: bool  # the model has reasoning / tool-call markers
    finish_reason: str
    usage: Usage
    logprobs: Optional[List[dict]]


@dataclasses.dataclass
class Failed:
    error: BackendError


# How often a waiting gRPC handler checks that the engine is still alive.
POLL_SECONDS = 0.5


class RequestHandle:
    """What a gRPC handler holds: the event queue and a cancel switch."""

    def __init__(self, request: GenerationRequest, loaded,
                 engine_failure: Callable[[], Optional[str]] = lambda: None):
        self.request = request
        self.loaded = loaded  # the model the request was tokenized for
        self.events: "queue.Queue" = queue.Queue()
        self.uid: Optional[int] = None  # set once the request is in the batch
        self.prefetched = None  # (cache, rest) rank 0 looked up for it (distributed mode)
        self.fault = faults.stage_of(request.correlation_id)
        self._engine_failure = engine_failure
        self._cancelled = threading.Event()

    def cancel(self):
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _next_event(self):
        """The next event; never waits on an engine that has failed."""
        while True:
            try:
                return self.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                failure = self._engine_failure()
                if failure:
                    raise Unavailable(f"the engine failed ({failure}); "
                                      "restart the backend") from None

    def __iter__(self):
        """Yield Delta events, then one Done; raise the error of a Failed.

        Deltas that piled up while the caller was busy come out merged, so a
        slow reader costs one message per read rather than one per token.
        """
        held = None  # an event read while merging, handled next
        while True:
            event, held = (held or self._next_event()), None
            while isinstance(event, Delta) and not self.events.empty():
                following = self.events.get()
                if not isinstance(following, Delta):
                    held = following
                    break
                event = Delta(event.text + following.text,
                              event.reasoning + following.reasoning,
                              following.structured, following.usage)
            if isinstance(event, Failed):
                raise event.error
            yield event
            if isinstance(event, Done):
                return
