"""Test-only fault injection, so the engine's isolation can be proven.

Off unless the server starts with `MLX_BACKEND_FAULT_INJECTION=1`. Then a
request whose `CorrelationId` is `fault:STAGE` raises at that stage of its
life on the engine thread, and a LoadModel option `fault:STAGE` does the
same for loading. Two stages are special: `engine_thread` kills the engine
thread itself, and `hang` stalls the engine for `HANG_SECONDS`, which is
how the watchdog is tested.
"""

import os
import time

ENABLED = os.environ.get("MLX_BACKEND_FAULT_INJECTION") == "1"

REQUEST_STAGES = ("admit", "cache_fetch", "cache_insert", "prefill", "decode", "detokenize",
                  "stop", "parse", "logprobs", "finish", "cancel")
HANG_SECONDS = 30.0
PREFIX = "fault:"


class InjectedFault(Exception):
    """Raised at a chosen stage; handled like any bug in that stage."""


class EngineKilled(BaseException):
    """Escapes every guard, as a fault in the engine loop itself would."""


def stage_of(correlation_id: str) -> str:
    """The stage a request asks to fail at ("" when injection is off)."""
    if not ENABLED or not correlation_id.startswith(PREFIX):
        return ""
    return correlation_id[len(PREFIX):]


def check(stage_wanted: str, stage: str) -> None:
    """Raise if this is the stage the request (or load) asked to fail at."""
    if not stage_wanted or stage_wanted != stage:
        return
    if stage == "engine_thread":
        raise EngineKilled("engine thread killed by fault injection")
    if stage == "hang":
        time.sleep(HANG_SECONDS)
        return
    raise InjectedFault(f"injected fault at stage {stage!r}")


def load_stage(options) -> str:
    """The stage a LoadModel asks to fail at, from an option `fault:STAGE`."""
    if not ENABLED:
        return ""
    for pair in options:
        key, _, value = pair.partition(":")
        if key.strip() == "fault":
            return value.strip()
    return ""
