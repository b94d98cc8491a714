"""The engine: one thread that owns the model, the MLX stream and the batch.

gRPC handlers never touch MLX. They submit work and read events from a
per-request queue; a cancelled call sets a flag the engine sees before its
next step. Generation is continuous batching on mlx-lm's `BatchGenerator`:
requests join the running batch between decode steps and leave it when done,
each with its own sampler, logits processors, stop rules and token budget.

Every request goes through the prompt cache: the nearest cached KV state is
taken, only the remaining tokens are processed, and the extended state is
inserted back under exactly the tokens it holds.
"""

import concurrent.futures
import dataclasses
import gc
import itertools
import logging
import os
import queue
import threading
import time
from typing import Callable, Dict, List, Optional

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import KVCache, can_trim_prompt_cache, trim_prompt_cache

from mlx_cache import ThreadSafeLRUPromptCache

from .errors import BackendError, Cancelled, FailedPrecondition, ResourceExhausted
from .model_loader import LoadedModel, load_model
from .options import ModelSettings, parse_options
from .output import TextStream, TokenBytes, logprob_entry
from .response_parser import ResponseParser
from .request import GenerationRequest
from .sampling import greedy_sampler, make_processors, make_sampler
from .scoring import embed, score_candidates

log = logging.getLogger(__name__)


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


class RequestHandle:
    """What a gRPC handler holds: the event queue and a cancel switch."""

    def __init__(self, request: GenerationRequest, loaded: LoadedModel):
        self.request = request
        self.loaded = loaded  # the model the request was tokenized for
        self.events: "queue.Queue" = queue.Queue()
        self._cancelled = threading.Event()

    def cancel(self):
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self):
        """Yield Delta events, then one Done; raise the error of a Failed.

        Deltas that piled up while the caller was busy come out merged, so a
        slow reader costs one message per read rather than one per token.
        """
        held = None  # an event read while merging, handled next
        while True:
            event, held = (held or self.events.get()), None
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


@dataclasses.dataclass
class _Slot:
    """Engine-side state of one request in the batch."""

    handle: RequestHandle
    uid: int
    text: TextStream
    parser: ResponseParser
    usage: Usage
    started: float
    errors: List[Exception]  # raised by this request's sampler or processors
    checkpoint_len: int = 0  # >0 while a checkpoint segment is still being prefilled
    first_token_at: Optional[float] = None
    logprobs: List[dict] = dataclasses.field(default_factory=list)
    content: str = ""
    reasoning: str = ""


def _guarded(fn, errors: List[Exception]):
    """Record a failure of one request's sampler or logits processor instead of
    breaking the whole batch step; the engine then fails that request alone."""
    def call(*args):
        try:
            return fn(*args)
        except Exception as err:  # reported to the request's caller
            errors.append(err)
            return args[-1] if len(args) > 1 else mx.argmax(args[0], axis=-1)
    return call


def _kv_length(cache) -> Optional[int]:
    offsets = {getattr(layer, "offset", None) for layer in cache}
    return offsets.pop() if len(offsets) == 1 else None


def _compact(cache):
    """Make a cache hold only its own positions before it is stored.

    KV state extracted from a batch is a lazy view of the whole batch buffer
    until evaluated, and a standalone KVCache grows in 256-position steps;
    either way the stored entry would pin far more memory than it reports.
    """
    for layer in cache:
        keys = getattr(layer, "keys", None)
        if isinstance(layer, KVCache) and keys is not None and keys.shape[2] > layer.offset:
            layer.keys = mx.contiguous(keys[..., :layer.offset, :])
            layer.values = mx.contiguous(layer.values[..., :layer.offset, :])
    mx.eval([layer.state for layer in cache])


def _cache_nbytes(cache) -> int:
    return sum(layer.nbytes for layer in cache)


def default_cache_bytes() -> int:
    """A quarter of the memory available now (bounded KV cache by default)."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        available = 8 * 2**30
    return max(available // 4, 64 * 2**20)


class Engine:
    def __init__(self):
        self._inbox: "queue.Queue" = queue.Queue()
        self._slots: Dict[int, _Slot] = {}
        self._queued = 0  # submitted, not yet admitted
        self._count_lock = threading.Lock()
        self._model_keys = itertools.count()
        self.loaded: Optional[LoadedModel] = None
        self.load_error: Optional[str] = None  # why the last LoadModel failed
        self.settings = ModelSettings()
        self.prompt_cache: Optional[ThreadSafeLRUPromptCache] = None
        self.last_metrics: dict = {}
        self._generator: Optional[BatchGenerator] = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="mlx-engine", daemon=True)
        self._thread.start()

    # ---- called from gRPC threads -------------------------------------------------

    def call(self, fn: Callable, *args):
        """Run fn(*args) on the engine thread between steps; return its result."""
        future = concurrent.futures.Future()
        self._inbox.put(("call", fn, args, future))
        return future.result()

    def submit(self, request: GenerationRequest, loaded: LoadedModel) -> RequestHandle:
        with self._count_lock:
            waiting = self._queued + len(self._slots)
            if waiting >= self.settings.max_queue:
                raise ResourceExhausted(
                    f"server is full: {waiting} requests queued or running "
                    f"(max_queue={self.settings.max_queue}); retry later")
            self._queued += 1
        handle = RequestHandle(request, loaded)
        self._inbox.put(("generate", handle))
        return handle

    @property
    def busy(self) -> bool:
        return bool(self._slots) or self._queued > 0

    def load(self, name, model_file, model_path, options=(), context_size=0) -> LoadedModel:
        """Load a model with LoadModel's "key:value" options; raises on failure."""
        return self.call(self._load, name, model_file, model_path, list(options), context_size)

    def free(self):
        self.load_error = None
        return self.call(self._unload, "the model was unloaded by Free")

    def score(self, loaded: LoadedModel, prompt_tokens: List[int],
              candidates: List[List[int]]):
        """Log-probabilities of candidates after a prompt (prompt KV via the cache)."""
        return self.call(self._score, loaded, prompt_tokens, candidates)

    def embed(self, loaded: LoadedModel, tokens: List[int]) -> List[float]:
        return self.call(lambda: embed(self._require_loaded(loaded).model, tokens))

    def shutdown(self):
        self.call(self._unload, "the server is shutting down")
        self._stop = True
        self._inbox.put(("wake",))
        self._thread.join(timeout=10)

    # ---- engine thread --------------------------------------------------------------

    def _run(self):
        # One MLX stream for the engine's life, made on the thread that uses it.
        self._stream = mx.new_stream(mx.default_device())
        while not self._stop:
            self._drain_inbox(block=not self._slots)
            self._drop_cancelled()
            if self._slots:
                try:
                    self._step()
                except Exception as err:  # a bug in a step must not kill the engine thread
                    log.exception("generation step failed")
                    self._fail_all(BackendError(f"generation failed: {err}"))
                    self._reset_generator()
                if not self._slots:
                    # Idle: hand MLX's freed buffers back instead of holding them.
                    mx.clear_cache()

    def _drain_inbox(self, block: bool):
        while True:
            try:
                item = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            kind = item[0]
            if kind == "call":
                _, fn, args, future = item
                try:
                    future.set_result(fn(*args))
                except BaseException as err:  # handed to the caller's thread, not swallowed
                    future.set_exception(err)
            elif kind == "generate":
                with self._count_lock:
                    self._queued -= 1
                self._admit(item[1])
            block = False

    def _load(self, name, model_file, model_path, options, context_size):
        try:
            settings = parse_options(options)  # a bad option keeps the current model
            self._unload("the model was replaced by LoadModel")
            loaded = load_model(name, model_file, model_path, settings, context_size)
        except BaseException as err:
            self.load_error = str(err)
            raise
        self.load_error = None
        max_bytes = settings.cache_bytes if settings.cache_bytes is not None \
            else default_cache_bytes()
        self.prompt_cache = ThreadSafeLRUPromptCache(
            max_size=settings.max_cache_entries,
            can_trim_fn=can_trim_prompt_cache,
            trim_fn=trim_prompt_cache,
            max_bytes=max_bytes,
            nbytes_fn=_cache_nbytes,
        )
        self.settings = settings
        self.loaded = loaded
        self._model_key = (loaded.source, next(self._model_keys))
        self._token_bytes = TokenBytes(loaded.tokenizer)
        self._reset_generator()
        return loaded

    def _require_loaded(self, expected: LoadedModel) -> LoadedModel:
        """The current model, if it is the one the request was tokenized for."""
        if self.loaded is None:
            raise FailedPrecondition("no model is loaded: call LoadModel first")
        if self.loaded is not expected:
            raise FailedPrecondition("the model was replaced while the request waited; "
                                     "retry the request")
        return self.loaded

    def _score(self, loaded, prompt_tokens, candidates):
        model = self._require_loaded(loaded).model
        cache, rest = self.fetch_cache(prompt_tokens)
        scores, cache = score_candidates(model, cache, rest, candidates,
                                         self.settings.prefill_step_size)
        self.insert_cache(prompt_tokens, cache)
        return scores

    def _reset_generator(self):
        if self._generator is not None:
            self._generator.close()
        s = self.settings
        self._generator = BatchGenerator(
            self.loaded.model,
            completion_batch_size=s.max_batch_size,
            prefill_batch_size=min(s.prefill_batch_size, s.max_batch_size),
            prefill_step_size=s.prefill_step_size,
            max_kv_size=s.max_kv_size,
            stream=self._stream,
        )

    def _unload(self, reason: str):
        self._fail_all(FailedPrecondition(f"{reason}; retry the request"))
        if self._generator is not None:
            self._generator.close()
        self._generator = None
        self.loaded = None
        if self.prompt_cache is not None:
            self.prompt_cache.clear()
        self.prompt_cache = None
        gc.collect()
        mx.clear_cache()

    def _fail_all(self, error: BackendError):
        for slot in list(self._slots.values()):
            slot.handle.events.put(Failed(error))
        self._slots.clear()

    # ---- prompt cache ------------------------------------------------------------------

    def fetch_cache(self, tokens: List[int]):
        """Nearest cached state and the tokens still to feed (never empty)."""
        if not self.settings.prompt_cache:
            return None, tokens
        cache, rest = self.prompt_cache.fetch_nearest_cache(self._model_key, tokens)
        if cache is not None and not rest:
            # Exact hit: logits for the last position are needed, so feed it again.
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = tokens[-1:]
            else:
                cache, rest = None, tokens
        return cache, rest

    def insert_cache(self, tokens: List[int], cache):
        if not self.settings.prompt_cache or not tokens or not cache:
            return
        if _kv_length(cache) != len(tokens):
            log.error("not caching: KV holds %s positions for %d tokens",
                      _kv_length(cache), len(tokens))
            return
        _compact(cache)
        self.prompt_cache.insert_cache(self._model_key, list(tokens), cache)

    # ---- generation ----------------------------------------------------------------------

    def _admit(self, handle: RequestHandle):
        if handle.cancelled:
            handle.events.put(Failed(Cancelled("cancelled before it started")))
            return
        try:
            self._require_loaded(handle.loaded)
        except FailedPrecondition as err:
            handle.events.put(Failed(err))
            return
        request = handle.request
        tokens = request.prompt_tokens
        started = time.perf_counter()
        cache, rest = self.fetch_cache(tokens)
        cached = len(tokens) - len(rest)
        segments = [rest]
        checkpoint_len = 0
        ckpt = request.checkpoint_tokens
        if ckpt and cached < len(ckpt) < len(tokens) - 1:
            checkpoint_len = len(ckpt)
            segments = [tokens[cached:checkpoint_len], tokens[checkpoint_len:]]
        tokenizer = self.loaded.tokenizer
        eos = [] if request.ignore_eos else [(t,) for t in tokenizer.eos_token_ids]
        errors: List[Exception] = []
        try:
            sampler = make_sampler(request.sampling, len(tokenizer),
                                   list(tokenizer.eos_token_ids))
            if sampler is not greedy_sampler:  # keep greedy rows batched together
                sampler = _guarded(sampler, errors)
            processors = [_guarded(p, errors) for p in make_processors(request.sampling)]
            if request.grammar is not None:
                processors.append(_guarded(request.grammar.processor(), errors))
            (uid,) = self._generator.insert_segments(
                [segments],
                max_tokens=[request.max_tokens],
                caches=[cache],
                all_tokens=[tokens[:cached]],
                samplers=[sampler],
                logits_processors=[processors],
                stop_sequences=[StopSequences(eos)],
            )
        except BackendError as err:
            handle.events.put(Failed(err))
            return
        log.info("request %s: %d prompt tokens, %d from the prompt cache",
                 request.correlation_id or uid, len(tokens), cached)
        self._slots[uid] = _Slot(
            handle=handle, uid=uid,
            text=TextStream(tokenizer, tokens[-4:], request.stop_strings),
            parser=ResponseParser(tokenizer, tokens, request.tools),
            usage=Usage(prompt_tokens=len(tokens), cached_tokens=cached),
            started=started, checkpoint_len=checkpoint_len, errors=errors,
        )

    def _drop_cancelled(self):
        cancelled = [uid for uid, slot in self._slots.items() if slot.handle.cancelled]
        if not cancelled:
            return
        removed = self._generator.remove(cancelled, return_prompt_caches=True)
        for cache, tokens in removed.values():
            self.insert_cache(tokens, cache)
        for uid in cancelled:
            slot = self._slots.pop(uid)
            slot.handle.events.put(Failed(Cancelled("the request was cancelled")))

    def _step(self):
        prompt_responses, generation_responses = self._generator.next()
        self._fail_broken()
        for response in prompt_responses:
            slot = self._slots.get(response.uid)
            if slot and slot.checkpoint_len and response.end_of_segment:
                self._save_checkpoint(slot)
        for response in generation_responses:
            slot = self._slots.get(response.uid)
            if slot is not None:
                self._on_token(slot, response)

    def _fail_broken(self):
        broken = [uid for uid, slot in self._slots.items() if slot.errors]
        if broken:
            self._generator.remove(broken)
        for uid in broken:
            slot = self._slots.pop(uid)
            err = slot.errors[0]
            log.error("request %s failed: %s", uid, err)
            if not isinstance(err, BackendError):
                err = BackendError(f"generation failed: {type(err).__name__}: {err}")
            slot.handle.events.put(Failed(err))

    def _save_checkpoint(self, slot: _Slot):
        """Keep the KV state at the end of the system prompt for new conversations."""
        extracted = self._generator.extract_cache([slot.uid]).get(slot.uid)
        slot.checkpoint_len = 0
        if extracted:
            cache, tokens = extracted
            self.insert_cache(list(tokens), cache)

    def _on_token(self, slot: _Slot, response):
        now = time.perf_counter()
        if slot.first_token_at is None:
            slot.first_token_at = now
            slot.usage.prompt_ms = (now - slot.started) * 1000
        is_eos = response.finish_reason == "stop"  # our stop sequences are EOS tokens only
        delta = ""
        if not is_eos:
            slot.usage.completion_tokens += 1
            if slot.handle.request.logprobs:
                slot.logprobs.append(logprob_entry(
                    self._token_bytes, response.token, response.logprobs,
                    slot.handle.request.top_logprobs))
            delta = slot.text.add(response.token)
        slot.usage.generation_ms = (now - slot.first_token_at) * 1000
        if slot.text.stopped:
            removed = self._generator.remove([slot.uid], return_prompt_caches=True)
            cache, tokens = removed.get(slot.uid, (None, None))
            self._finish(slot, delta, "stop", cache, tokens)
        elif response.finish_reason is not None:
            delta += slot.text.finish()
            self._finish(slot, delta, response.finish_reason,
                         response.prompt_cache, response.all_tokens)
        else:
            self._emit(slot, *slot.parser.feed(delta))

    def _emit(self, slot: _Slot, content: str, reasoning: str):
        slot.content += content
        slot.reasoning += reasoning
        if content or reasoning:
            slot.handle.events.put(Delta(content, reasoning, slot.parser.enabled,
                                         dataclasses.replace(slot.usage)))

    def _finish(self, slot: _Slot, delta: str, reason: str, cache, tokens):
        del self._slots[slot.uid]
        self.insert_cache(tokens, cache)
        content, reasoning = slot.parser.feed(delta)
        tail_content, tail_reasoning = slot.parser.finish()
        self._emit(slot, content + tail_content, reasoning + tail_reasoning)
        usage = slot.usage
        self.last_metrics = {
            "tokens_generated": usage.completion_tokens,
            "prompt_tokens_processed": usage.prompt_tokens - usage.cached_tokens,
            "tokens_per_second": (usage.completion_tokens / (usage.generation_ms / 1000)
                                  if usage.generation_ms > 0 else 0.0),
        }
        slot.handle.events.put(Done(
            text=slot.content, reasoning=slot.reasoning, tool_calls=slot.parser.tool_calls(),
            structured=slot.parser.enabled, finish_reason=reason, usage=usage,
            logprobs=slot.logprobs if slot.handle.request.logprobs else None))
