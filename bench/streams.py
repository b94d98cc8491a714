"""Timed streaming calls: the client-side timeline of every PredictStream reply,
streams run in the background as load, and aggregate rates of streams that ran
together."""

import threading
import time
from typing import List, Optional

import grpc

import backend_pb2
from common import median


def predict_options(prompt: str, tokens: int, ignore_eos: bool = True, **fields):
    return backend_pb2.PredictOptions(Prompt=prompt, Tokens=tokens, IgnoreEOS=ignore_eos,
                                      Temperature=0.0, **fields)


class StreamResult:
    """Client-side timeline of one PredictStream call."""

    def __init__(self):
        self.sent = None  # perf_counter when the call was made
        self.points: List[tuple] = []  # (time, completion tokens so far) per reply
        self.first_text = None  # time of the first reply carrying text
        self.final = None  # the last Reply (usage + server timings)
        self.error = None
        self.cancelled = False
        self.finished = False  # the stream ended normally (after its final reply)
        self.prompt_tokens = None  # as the server counted them (when it says)

    @property
    def ttft(self) -> Optional[float]:
        return None if self.first_text is None else self.first_text - self.sent

    @property
    def first_token_time(self) -> Optional[float]:
        for t, n in self.points:
            if n >= 1:
                return t
        return None

    @property
    def last_time(self):
        return self.points[-1][0] if self.points else None

    @property
    def tokens(self) -> int:
        return self.points[-1][1] if self.points else 0

    def decode_rate(self) -> Optional[float]:
        """Tokens after the first / time after the first (client clock)."""
        first = next(((t, n) for t, n in self.points if n >= 1), None)
        if first is None or not self.points:
            return None
        t_end, n_end = self.points[-1]
        if t_end <= first[0] or n_end <= first[1]:
            return None
        return (n_end - first[1]) / (t_end - first[0])

    def tokens_at(self, t: float) -> int:
        count = 0
        for when, n in self.points:
            if when > t:
                break
            count = n
        return count


def run_stream(stub, request, result: Optional[StreamResult] = None,
               timeout: float = 900, on_call=None) -> StreamResult:
    """Run one PredictStream to its end (or cancellation), timing every reply."""
    result = result or StreamResult()
    result.sent = time.perf_counter()
    try:
        call = stub.PredictStream(request, timeout=timeout)
        if on_call is not None:
            on_call(call)
        for reply in call:
            now = time.perf_counter()
            result.points.append((now, reply.tokens))
            if reply.message and result.first_text is None:
                result.first_text = now
            result.final = reply
            result.prompt_tokens = reply.prompt_tokens
        result.finished = True
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.CANCELLED:
            result.cancelled = True
        else:
            result.error = f"{err.code().name}: {err.details()}"
    return result


class Background:
    """N streams running in threads, cancellable (load for other measurements)."""

    def __init__(self, stub, requests):
        self.results = [StreamResult() for _ in requests]
        self.calls = [None] * len(requests)
        self._lock = threading.Lock()
        self._stopping = False
        self.threads = []
        for i, request in enumerate(requests):
            thread = threading.Thread(target=self._run, args=(stub, request, i), daemon=True)
            self.threads.append(thread)
        for thread in self.threads:
            thread.start()

    def _run(self, stub, request, i):
        def on_call(call):
            with self._lock:
                self.calls[i] = call
                if self._stopping:
                    call.cancel()
        run_stream(stub, request, self.results[i], on_call=on_call)

    def wait_all_decoding(self, timeout=600) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(r.first_token_time is not None or r.error or r.finished
                   for r in self.results):
                return True
            time.sleep(0.02)
        return False

    def join(self, timeout=None):
        for thread in self.threads:
            thread.join(timeout)

    def cancel(self):
        with self._lock:
            self._stopping = True
            calls = [c for c in self.calls if c is not None]
        for call in calls:
            call.cancel()
        self.join(60)

    def errors(self):
        return [r.error for r in self.results if r.error]


def summarize_streams(results) -> dict:
    """Aggregate decode rates of streams that ran together.

    steady: tokens generated while all N streams were decoding (from the last
    stream's first token to the first stream's last reply) per second of that
    window; phase: every token after each stream's first, over the time from
    the first first-token to the last reply; wall: every token over the time
    from the first call to the last reply (prefill included).
    """
    firsts = [r.first_token_time for r in results]
    lasts = [r.last_time for r in results]
    out = {"streams": len(results), "tokens": sum(r.tokens for r in results),
           "steady_tps": None, "phase_tps": None, "wall_tps": None,
           "prompt_tokens": [r.prompt_tokens for r in results]}
    if any(t is None for t in firsts + lasts):
        return out
    out["wall_tps"] = out["tokens"] / (max(lasts) - min(r.sent for r in results))
    t0, t1 = max(firsts), min(lasts)
    if t1 > t0:
        made = sum(r.tokens_at(t1) - r.tokens_at(t0) for r in results)
        if made > 0:
            out["steady_tps"] = made / (t1 - t0)
            out["steady_window_s"] = t1 - t0
    start, end = min(firsts), max(lasts)
    after_first = sum(r.tokens - r.tokens_at(r.first_token_time) for r in results)
    if end > start:
        out["phase_tps"] = after_first / (end - start)
    out["phase_start"], out["phase_end"] = start, end
    rates = [r.decode_rate() for r in results]
    out["per_stream_tps"] = median(rates)
    out["ttft_s_median"] = median([r.ttft for r in results])
    return out


def run_streams(server, prompts, tokens: int, label: str) -> dict:
    """Stream `prompts` together to the end and wait for the server to idle;
    their summary, with `aggregate_tps` (the steady rate, else the phase rate;
    for one stream, its decode rate)."""
    bg = Background(server.stub, [predict_options(p, tokens) for p in prompts])
    bg.join()
    server.wait_idle()
    if bg.errors():
        raise RuntimeError(f"{label}: {bg.errors()[0]}")
    summary = summarize_streams(bg.results)
    summary["aggregate_tps"] = (summary["per_stream_tps"] if len(prompts) == 1
                                else summary["steady_tps"] or summary["phase_tps"])
    return summary


def warm_up(server, prompts, tokens: int = 8):
    """Unmeasured requests on a fresh server: one alone, then all together (the
    first request and the first batch of a size compile and allocate)."""
    for batch in ([prompts[0]], prompts):
        run_streams(server, batch, tokens, f"warm-up on server {server.name}")
