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

import collections
import concurrent.futures
import contextlib
import dataclasses
import gc
import itertools
import logging
import queue
import threading
import time
from typing import Callable, Dict, List, Optional

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from . import faults
from .adapters import check as check_adapters
from .errors import (BackendError, Cancelled, FailedPrecondition, InvalidArgument,
                     ResourceExhausted, Unavailable)
from .distributed.engine_ticks import TickingEngine
from .distributed.engine_ticks import check_load as check_distributed_load
from .distributed.group import describe_loss
from .distributed.lockstep import Diverged
from .events import POLL_SECONDS, Delta, Done, Failed, RequestHandle, Usage
from .generation import StopRule, plan_generation
from .kv_cache import MIN_LONGER_KEEP, compact, default_cache_bytes, kv_length, kv_prefix
from .kv_quant import batchable, check_head_dim, kv_quantization, make_quantized_cache
from .model_loader import LoadedModel, load_model
from .options import ModelSettings, parse_options
from .output import TokenBytes, logprob_entry
from .prompt_cache import ThreadSafeLRUPromptCache
from .prompt_store import PromptStore, model_identity
from .request import GenerationRequest, LoadRequest
from .response_parser import ResponseParser
from .sampling import greedy_sampler
from .scoring import embed, score_candidates
from .speculative import PromptLookupDraft, SoloSpeculation, check_vocabulary

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Slot:
    """Engine-side state of one request in the batch."""

    handle: RequestHandle
    uid: int
    stop: StopRule
    parser: ResponseParser
    usage: Usage
    started: float
    errors: List[Exception]  # raised by this request's sampler or processors
    processors: list = dataclasses.field(default_factory=list)  # guarded, as in the batch
    spec: Optional[SoloSpeculation] = None  # decoding alone with a draft model
    generated: List[int] = dataclasses.field(default_factory=list)
    checkpoint_len: int = 0  # >0 while a checkpoint segment is still being prefilled
    first_token_at: Optional[float] = None
    logprobs: List[dict] = dataclasses.field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
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


class Engine(TickingEngine):
    """Continuous batching on one thread, with a watchdog beside it.

    Every per-request stage on the engine thread (admission, cache fetch and
    insert, prefill, decode, detokenizing, stop strings, parsing, logprobs,
    finishing, cancellation) runs under `_isolated`, so a fault there fails
    that request alone. The watchdog notices what no guard can catch (the
    thread died, a step never returned) and marks the engine failed: every
    waiting handler then answers UNAVAILABLE and Health stops saying OK, so
    LocalAI restarts the backend.
    """

    def __init__(self, lockstep=None):
        self._inbox: "queue.Queue" = queue.Queue()
        self._pending: collections.deque = collections.deque()  # inbox items held for a tick
        self._lockstep = lockstep  # a distributed.Lockstep once this rank is in a group
        self._grammars: Dict[tuple, object] = {}  # a worker's compiled grammars, by text
        self._slots: Dict[int, _Slot] = {}
        self._queued = 0  # submitted, not yet admitted
        self._count_lock = threading.Lock()
        self._model_keys = itertools.count()
        self.loaded: Optional[LoadedModel] = None
        self.load_error: Optional[str] = None  # why the last LoadModel failed
        self.settings = ModelSettings()
        self.prompt_cache: Optional[ThreadSafeLRUPromptCache] = None
        self.last_metrics: dict = {}
        self.failure: Optional[str] = None  # why the engine can no longer serve; sticky
        self.kv_quant = None  # (bits, group size) of a quantized KV cache, or None
        self.draft = None  # DraftModel (or prompt lookup), for speculative decoding
        self.draft_stats = {"drafted": 0, "accepted": 0}  # lifetime counters
        self._solo_uids = itertools.count(-1, -1)  # ids of requests outside the batch
        self._kv_bytes = 0  # KV state of the running batch, measured after each step
        self.on_failure: List[Callable[[str], None]] = []
        self.parallel: Optional[str] = None  # "tensor" or "pipeline" in distributed mode
        self._activity = None  # (what, since, bounded) while the engine thread works
        self._generator: Optional[BatchGenerator] = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="mlx-engine", daemon=True)
        self._thread.start()
        if lockstep is not None:  # a worker rank, in its group from the start
            self._watch_ranks()
        threading.Thread(target=self._watch, name="mlx-watchdog", daemon=True).start()

    # ---- called from gRPC threads -------------------------------------------------

    def call(self, fn: Callable, *args, bounded: bool = True):
        """Run fn(*args) on the engine thread between steps; return its result.

        `bounded` calls count against the step timeout (loading does not:
        a download or import may take as long as it takes).
        """
        self._check_alive()
        future = concurrent.futures.Future()
        self._inbox.put(("call", fn, args, future, bounded))
        while not future.done():
            concurrent.futures.wait([future], timeout=POLL_SECONDS)
            if not future.done():
                self._check_alive()
        return future.result()

    def submit(self, request: GenerationRequest, loaded: LoadedModel) -> RequestHandle:
        self._check_alive()
        with self._count_lock:
            waiting = self._queued + len(self._slots)
            if waiting >= self.settings.max_queue:
                raise ResourceExhausted(
                    f"server is full: {waiting} requests queued or running "
                    f"(max_queue={self.settings.max_queue}); retry later")
            self._queued += 1
        handle = RequestHandle(request, loaded, lambda: self.failure)
        self._inbox.put(("generate", handle))
        return handle

    @property
    def stopped(self) -> bool:
        """True once shut down (a worker: once rank 0 stopped the group)."""
        return self._stop

    @property
    def busy(self) -> bool:
        return bool(self._slots) or self._queued > 0

    def load(self, request: LoadRequest) -> LoadedModel:
        """Load a model as LoadModel asks; raises on failure."""
        return self.call(self._load, request, bounded=False)

    def free(self):
        self.load_error = None
        return self.call(self._unload, "the model was unloaded by Free")

    def score(self, loaded: LoadedModel, prompt_tokens: List[int],
              candidates: List[List[int]], cancelled: Callable[[], bool] = lambda: False):
        """Log-probabilities of candidates after a prompt (prompt KV via the cache)."""
        return self.call(self._score, loaded, prompt_tokens, candidates, cancelled)

    def embed(self, loaded: LoadedModel, tokens: List[int],
              cancelled: Callable[[], bool] = lambda: False) -> List[float]:
        return self.call(self._embed, loaded, tokens, cancelled)

    def _embed(self, loaded, tokens, cancelled):
        return embed(self._require_loaded(loaded).model, tokens,
                     self.settings.prefill_step_size, cancelled)

    def memory(self) -> Dict[str, int]:
        """Status's memory breakdown: MLX's allocator, the weights, and the
        prompt cache with its counters (entries, hits, misses, evictions)."""
        loaded, cache = self.loaded, self.prompt_cache
        breakdown = {
            "mlx_active": mx.get_active_memory(),
            "mlx_peak": mx.get_peak_memory(),
            "mlx_buffer_cache": mx.get_cache_memory(),
            "weights": loaded.weights_bytes if loaded else 0,
            "draft_weights": self.draft.weights_bytes if self.draft else 0,
            "kv_cache": self._kv_bytes if self._slots else 0,
            "prompt_cache": cache.nbytes if cache is not None else 0,
            "prompt_cache_entries": len(cache) if cache is not None else 0,
        }
        if self._lockstep is not None:
            breakdown.update({f"distributed_{key}": int(value) for key, value
                              in self._lockstep.stats().items()})
        if cache is not None:
            breakdown.update({f"prompt_cache_{key}": int(value)
                              for key, value in cache.stats().items()
                              if isinstance(value, (int, float)) and key not in
                              ("entries", "nbytes", "bytes")})
        return breakdown

    def shutdown(self, timeout: float = 10.0):
        """Unload and stop the thread, waiting at most `timeout` for an engine
        that is busy (mid-import) or wedged: exiting must never hang."""
        if self.failure is None:
            future = concurrent.futures.Future()
            self._inbox.put(("call", self._unload, ("the server is shutting down",),
                             future, True))
            concurrent.futures.wait([future], timeout=timeout)
            if self._lockstep is not None:  # the workers stop with us
                future = concurrent.futures.Future()
                self._inbox.put(("stop", future))
                concurrent.futures.wait([future], timeout=timeout)
        self._stop = True
        self._inbox.put(("wake",))
        self._thread.join(timeout=1.0)

    def _check_alive(self):
        if self.failure is not None:
            raise Unavailable(f"the engine failed ({self.failure}); restart the backend")

    # ---- watchdog -------------------------------------------------------------------------

    def _watch(self):
        while not self._stop and self.failure is None:
            time.sleep(POLL_SECONDS / 2)
            problem = self._diagnose()
            if problem and not self._stop:
                self._declare_failed(problem)

    def _diagnose(self) -> Optional[str]:
        if not self._thread.is_alive():
            return "the engine thread died"
        activity, timeout, name = self._activity, self.settings.step_timeout, "step_timeout"
        if self._lockstep is not None and (not timeout or
                                           timeout > self.settings.distributed_step_timeout):
            # A rank that stopped answering can leave a collective waiting forever.
            timeout, name = self.settings.distributed_step_timeout, "distributed_step_timeout"
        if activity and activity[2] and timeout:
            what, since, _ = activity
            if time.monotonic() - since > timeout:
                problem = f"{what} has not returned within {name}={timeout:g}s"
                if self._lockstep is not None:
                    lockstep = self._lockstep
                    problem = (f"{describe_loss(lockstep.config, lockstep.size)}: {problem}"
                               if lockstep.rank == 0 else f"rank 0 is gone: {problem}")
                return problem
        return None

    def _declare_failed(self, reason: str):
        if self.failure is not None:
            return
        self.failure = reason
        log.critical("engine failed: %s; in-flight requests answer UNAVAILABLE and Health "
                     "reports it", reason)
        for callback in self.on_failure:
            try:
                callback(reason)
            except Exception:  # a listener must not stop the others from hearing it
                log.exception("failure listener raised")

    @contextlib.contextmanager
    def _working_on(self, what: str, bounded: bool = True):
        self._activity = (what, time.monotonic(), bounded)
        try:
            yield
        finally:
            self._activity = None

    # ---- engine thread --------------------------------------------------------------

    def _run(self):
        # One MLX stream for the engine's life, made on the thread that uses it.
        self._stream = mx.new_stream(mx.default_device())
        try:
            while not self._stop:
                try:
                    self._iterate()
                except Exception as err:  # our own bug outside any request: the batch goes
                    log.exception("engine loop failed")
                    if self._lockstep is not None:  # and the ranks may no longer agree
                        self._group_failed(err)
                        break
                    self._fail_all(BackendError(f"generation failed: {type(err).__name__}: "
                                                f"{err}"))
                    self._reset_generator()
        finally:
            if not self._stop:
                self._declare_failed("the engine thread died")

    def _iterate(self):
        if self._lockstep is not None:
            if not self._tick():
                return
        else:
            self._drain_inbox(block=not self._slots)
            self._drop_cancelled()
        if not self._slots:
            return
        solo = [slot for slot in self._slots.values() if slot.spec is not None]
        if solo and len(self._slots) > 1:  # someone else arrived: join the batch
            for slot in solo:
                with self._isolated(slot.handle, "joining the batch"):
                    self._join_batch(slot)
        elif solo:
            with self._working_on("a speculative step"):
                with self._isolated(solo[0].handle, "speculative decoding"):
                    self._speculate(solo[0])
            return
        with self._working_on("a generation step"):
            try:
                self._step()
                self._kv_bytes = self._generator.prompt_cache_nbytes
            except Exception as err:  # a step fault no single request owns
                if self._lockstep is not None:  # the ranks may no longer agree
                    self._group_failed(err)
                    return
                log.exception("generation step failed")
                self._fail_all(BackendError(f"generation failed: {type(err).__name__}: {err}"))
                self._reset_generator()
        if not self._slots:
            # Idle: hand MLX's freed buffers back instead of holding them.
            mx.clear_cache()

    def _drain_inbox(self, block: bool):
        while True:
            try:
                item = self._inbox.get(block=block, timeout=POLL_SECONDS if block else None)
            except queue.Empty:
                return
            kind = item[0]
            if kind == "call" and item[1] == self._load and self._joins_group(item):
                return  # the load is shared with the workers in the first tick
            if kind == "call":
                _, fn, args, future, bounded = item
                with self._working_on(getattr(fn, "__name__", "a call"), bounded):
                    try:
                        future.set_result(fn(*args))
                    except BaseException as err:  # handed to the caller's thread
                        future.set_exception(err)
            elif kind == "generate":
                with self._count_lock:
                    self._queued -= 1
                handle = item[1]
                faults.check(handle.fault, "engine_thread")
                with self._isolated(handle, "admitting the request"):
                    self._admit(handle)
            block = False

    @contextlib.contextmanager
    def _isolated(self, handle: RequestHandle, stage: str):
        """Run one request's stage; a fault fails that request alone."""
        try:
            yield
        except Exception as err:
            self._fail_request(handle, err, stage)

    def _fail_request(self, handle: RequestHandle, err: Exception, stage: str):
        if handle.uid is not None:
            slot = self._slots.pop(handle.uid, None)
            if slot is not None:
                _close_quietly(slot)
            try:
                self._generator.remove([handle.uid])
            except Exception:  # the batch itself is suspect now: start it afresh
                log.exception("could not remove request %s from the batch", handle.uid)
                self._fail_all(BackendError("generation failed: the batch was reset after "
                                            "a fault in another request; retry"))
                self._reset_generator()
        if isinstance(err, BackendError):
            log.info("request %s failed while %s: %s",
                     handle.request.correlation_id or handle.uid, stage, err)
        else:
            log.error("request %s failed while %s", handle.request.correlation_id or handle.uid,
                      stage, exc_info=err)
            err = BackendError(f"internal error while {stage}: {type(err).__name__}: {err}")
        handle.events.put(Failed(err))

    def _load(self, request: LoadRequest):
        try:
            settings = parse_options(request.options)  # a bad option keeps the current model
            check_adapters(request)  # so does a bad LoRA adapter
            kv_quant = kv_quantization(settings.kv_bits, settings.kv_group_size,
                                       settings.quantized_kv_start, request.cache_type_key,
                                       request.cache_type_value)
            if kv_quant and settings.max_kv_size:
                raise InvalidArgument("a quantized KV cache cannot be combined with "
                                      "max_kv_size (a rotating window): choose one")
            if self._lockstep is not None:
                check_distributed_load(request, settings)
            fault = faults.load_stage(request.options)
            faults.check(fault, "load")
            faults.check(fault, "hang")
            self._unload("the model was replaced by LoadModel")
            loaded = load_model(request, settings, prepare=self._shard_for(settings))
            if kv_quant:
                check_head_dim(loaded.model, kv_quant[1])
            draft = self._load_draft(request, settings, loaded)
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
            slice_fn=kv_prefix,
            max_bytes=max_bytes,
            nbytes_fn=self._cache_bytes_fn(loaded),
            min_longer_keep=MIN_LONGER_KEEP,
            count_keys=True,
        )
        self.settings = settings
        self.loaded = loaded
        self.kv_quant = kv_quant
        self.draft = draft
        self._model_key = (loaded.source, next(self._model_keys))
        # Saved caches are only valid for the same weights and KV format.
        self._identity = model_identity(loaded) + (
            f"-kv{kv_quant[0]}g{kv_quant[1]}" if kv_quant else "")
        self._stores = {}
        self._token_bytes = TokenBytes(loaded.tokenizer)
        self._reset_generator()
        if settings.prompt_cache_path and settings.prompt_cache:
            self._store(settings.prompt_cache_path)
        return loaded

    def _load_draft(self, request: LoadRequest, settings, loaded):
        """The DraftModel, resolved like Model, checked to share its vocabulary;
        or the prompt-lookup draft; or None."""
        if not request.draft_model and not settings.prompt_lookup:
            return None
        if settings.max_kv_size:
            raise InvalidArgument("speculative decoding cannot be combined with max_kv_size: "
                                  "it needs a cache it can rewind")
        if settings.prompt_lookup:
            if request.draft_model:
                raise InvalidArgument("choose one draft: DraftModel or prompt_lookup:true")
            args = getattr(loaded.model, "args", None)
            vocab = max(len(loaded.tokenizer), getattr(args, "vocab_size", 0) or 0)
            return PromptLookupDraft(vocab)
        draft = load_model(LoadRequest(request.draft_model, model_path=request.model_path),
                           settings, warm=False)  # the model's warm-up built the kernels
        check_vocabulary(loaded.tokenizer, draft.tokenizer, request.draft_model)
        log.info("draft model %s: %d draft tokens per step by default", draft.source,
                 settings.num_draft_tokens)
        return draft

    def _require_loaded(self, expected: LoadedModel) -> LoadedModel:
        """The current model, if it is the one the request was tokenized for."""
        if self.loaded is None:
            raise FailedPrecondition("no model is loaded: call LoadModel first")
        if self.loaded is not expected:
            raise FailedPrecondition("the model was replaced while the request waited; "
                                     "retry the request")
        return self.loaded

    def _new_cache(self):
        """A fresh per-sequence cache: quantized when asked for, else None
        (the batch generator makes mlx-lm's own)."""
        if not self.kv_quant:
            return None
        return make_quantized_cache(len(self.loaded.model.layers), *self.kv_quant)

    def _score(self, loaded, prompt_tokens, candidates, cancelled):
        model = self._require_loaded(loaded).model
        cache, rest = self.fetch_cache(prompt_tokens)
        if cache is None:
            cache = self._new_cache()
        scores, cache = score_candidates(model, cache, rest, candidates,
                                         self.settings.prefill_step_size, cancelled,
                                         self.settings.max_kv_size)
        self.insert_cache(prompt_tokens, cache)
        return scores

    def _reset_generator(self):
        if self._generator is not None:
            try:
                self._generator.close()
            except Exception:  # a broken generator is being replaced anyway
                log.exception("closing the batch generator failed")
        self._generator = None
        if self.loaded is None:
            return
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
        self.draft = None
        self._grammars.clear()  # compiled for the old tokenizer
        if self.prompt_cache is not None:
            self.prompt_cache.clear()
        self.prompt_cache = None
        gc.collect()
        mx.clear_cache()

    def _fail_all(self, error: BackendError):
        for slot in list(self._slots.values()):
            _close_quietly(slot)
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

    def insert_cache(self, tokens: List[int], cache, pinned: bool = False) -> bool:
        if not self.settings.prompt_cache or not tokens or not cache:
            return False
        if kv_length(cache) != len(tokens):
            log.error("not caching: KV holds %s positions for %d tokens",
                      kv_length(cache), len(tokens))
            return False
        compact(cache)
        self.prompt_cache.insert_cache(self._model_key, list(tokens), cache, pinned=pinned)
        return True

    def _insert_for(self, handle: RequestHandle, tokens, cache, checkpoint: bool = False):
        """Cache a request's KV state; save it to the request's prompt cache
        folder too when it is a checkpoint (or every turn, with PromptCacheAll)."""
        faults.check(handle.fault, "cache_insert")
        request = handle.request
        if not self.insert_cache(tokens, cache, pinned=checkpoint):
            return
        if request.cache_path and not request.cache_read_only \
                and (checkpoint or request.cache_all):
            self._store(request.cache_path).save(list(tokens), cache)

    def _store(self, folder: str) -> PromptStore:
        """The prompt cache folder at `folder`; its saved caches join the
        in-memory cache the first time it is named."""
        store = self._stores.get(folder)
        if store is None:
            store = self._stores[folder] = PromptStore(
                folder, self._identity, self.settings.prompt_cache_disk_bytes)
            loaded = 0
            for tokens, cache in store.load(budget=self.prompt_cache.max_bytes or 2**62):
                self.prompt_cache.insert_cache(self._model_key, tokens, cache, pinned=True)
                loaded += 1
            log.info("prompt cache folder %s: %d saved prompts loaded", folder, loaded)
        return store

    # ---- generation ----------------------------------------------------------------------

    def _admit(self, handle: RequestHandle, expected_cached: Optional[int] = None):
        """Put a request into the batch. In distributed mode rank 0 checked it
        and looked up the prompt cache already (`expected_cached` is what it
        found; every other rank must find the same)."""
        if handle.cancelled and self._lockstep is None:  # the caller left: no work at all
            handle.events.put(Failed(Cancelled("cancelled before it started")))
            return
        self._require_loaded(handle.loaded)
        faults.check(handle.fault, "admit")
        request = handle.request
        tokens = request.prompt_tokens
        started = time.perf_counter()
        faults.check(handle.fault, "cache_fetch")
        if request.cache_path and self.settings.prompt_cache:
            self._store(request.cache_path)
        prefetched, handle.prefetched = handle.prefetched, None
        cache, rest = prefetched or self.fetch_cache(tokens)
        if expected_cached is not None and len(tokens) - len(rest) != expected_cached:
            raise Diverged(f"the prompt cache found {len(tokens) - len(rest)} tokens where "
                           f"rank 0 found {expected_cached}")
        if cache is None:
            cache = self._new_cache()
        elif self.kv_quant:
            for layer in cache:  # a cache read from disk has not been made batchable yet
                batchable(layer)
        cached = len(tokens) - len(rest)
        segments = [rest]
        checkpoint_len = 0
        ckpt = request.checkpoint_tokens
        if ckpt and cached < len(ckpt) < len(tokens) - 1:
            checkpoint_len = len(ckpt)
            segments = [tokens[cached:checkpoint_len], tokens[checkpoint_len:]]
        tokenizer = self.loaded.tokenizer
        plan = plan_generation(request, tokenizer)
        # Each request's sampler and processors are guarded: a fault in one
        # is recorded and fails that request, never the batch step.
        errors: List[Exception] = []
        sampler = plan.sampler
        if sampler is not greedy_sampler:  # keep greedy rows batched together
            sampler = _guarded(sampler, errors)
        processors = [_guarded(p, errors) for p in plan.processors]
        if handle.fault == "decode":
            processors.append(_guarded(_fault_processor(handle.fault), errors))
        parser = ResponseParser(tokenizer, tokens, request.tools)
        slot = _Slot(handle=handle, uid=0, stop=plan.stop, parser=parser,
                     usage=Usage(prompt_tokens=len(tokens), cached_tokens=cached),
                     started=started, checkpoint_len=checkpoint_len, errors=errors,
                     processors=processors)
        num_draft = self._num_draft(request, len(rest))
        if num_draft and not checkpoint_len:
            slot.spec = SoloSpeculation(
                self.loaded.model, self.draft.model, cache, tokens[:cached], rest, num_draft,
                request.max_tokens, processors, self._stream, self.settings.prefill_step_size)
            handle.uid = slot.uid = next(self._solo_uids)
            self._slots[slot.uid] = slot
            log.info("request %s: %d prompt tokens, %d from the prompt cache, %d draft "
                     "tokens per step", request.correlation_id or slot.uid, len(tokens),
                     cached, num_draft)
            return
        (handle.uid,) = self._generator.insert_segments(
            [segments],
            max_tokens=[request.max_tokens],
            caches=[cache],
            all_tokens=[tokens[:cached]],
            samplers=[sampler],
            logits_processors=[processors],
            stop_sequences=[plan.stop.stop_sequences()],
        )
        log.info("request %s: %d prompt tokens, %d from the prompt cache",
                 request.correlation_id or handle.uid, len(tokens), cached)
        slot.uid = handle.uid
        self._slots[handle.uid] = slot

    def _drop_cancelled(self, uids=None):
        """Take cancelled requests out (in distributed mode, exactly the `uids`
        rank 0 shared, whatever was cancelled since)."""
        for slot in [s for s in self._slots.values()
                     if (s.uid in uids if uids is not None else s.handle.cancelled)]:
            with self._isolated(slot.handle, "cancelling the request"):
                faults.check(slot.handle.fault, "cancel")
                if slot.spec is not None:
                    removed = {slot.uid: self._end_speculation(slot)}
                else:
                    removed = self._generator.remove([slot.uid], return_prompt_caches=True)
                del self._slots[slot.uid]
                for cache, tokens in removed.values():
                    self._insert_for(slot.handle, tokens, cache)
                slot.handle.events.put(Failed(Cancelled("the request was cancelled")))

    # ---- speculative decoding (one request alone) -----------------------------------------

    def _num_draft(self, request: GenerationRequest, rest: int) -> int:
        """Draft tokens per step for a request, 0 when it should not speculate:
        no draft model, not alone, not greedy, a grammar (its matcher cannot
        rewind), NDraft < 0, or a prompt too long to prefill in one step."""
        if self.draft is None or request.n_draft < 0 or self._slots or self._queued:
            return 0
        if not request.sampling.greedy or request.grammar is not None:
            return 0
        if rest > self.settings.prefill_step_size:
            return 0
        return request.n_draft or self.settings.num_draft_tokens

    def _speculate(self, slot: _Slot):
        """One draft-and-verify round for the request decoding alone."""
        tokens = slot.spec.round()
        slot.drafted, slot.accepted = slot.spec.drafted, slot.spec.accepted
        self._fail_broken()
        if slot.uid not in self._slots:
            return
        if not tokens:  # the steps ran out (the budget): the rule should have ended it
            slot.stop.end("length", "token budget")
            cache, all_tokens = self._end_speculation(slot)
            self._finish(slot, "", cache, all_tokens)
            return
        for token, logprobs in tokens:
            self._on_token(slot, _Response(token, logprobs))
            if slot.uid not in self._slots:  # it finished within the round
                return

    def _end_speculation(self, slot: _Slot):
        """(cache, tokens) of a speculating request as it stops: the target's
        cache and exactly the tokens it holds."""
        spec, slot.spec = slot.spec, None
        cache = spec.close()
        self.draft_stats["drafted"] += spec.drafted
        self.draft_stats["accepted"] += spec.accepted
        everything = slot.handle.request.prompt_tokens + slot.generated
        return cache, everything[:kv_length(cache)]

    def _join_batch(self, slot: _Slot):
        """Move a speculating request into the batch, its KV cache as it is:
        the batch continues from its last token with the same greedy rule."""
        request = slot.handle.request
        cache, held = self._end_speculation(slot)
        everything = request.prompt_tokens + slot.generated
        if len(held) == len(everything):  # the last token must be fed again for its logits
            trim_prompt_cache(cache, 1)
            held = held[:-1]
        if self.kv_quant:
            for layer in cache:
                batchable(layer)
        del self._slots[slot.uid]
        (uid,) = self._generator.insert_segments(
            [[everything[len(held):]]],
            max_tokens=[request.max_tokens - slot.stop.generated],
            caches=[cache], all_tokens=[held], samplers=[greedy_sampler],
            logits_processors=[slot.processors],
            stop_sequences=[slot.stop.stop_sequences()])
        slot.uid = slot.handle.uid = uid
        self._slots[uid] = slot
        log.info("request %s: joins the batch after %d tokens (%d drafted, %d accepted)",
                 request.correlation_id or uid, len(slot.generated), slot.drafted,
                 slot.accepted)

    def _step(self):
        prompt_responses, generation_responses = self._generator.next()
        self._fail_broken()
        for response in prompt_responses:
            slot = self._slots.get(response.uid)
            if slot is not None:
                with self._isolated(slot.handle, "processing the prompt"):
                    faults.check(slot.handle.fault, "prefill")
                    if slot.checkpoint_len and response.end_of_segment:
                        self._save_checkpoint(slot)
        for response in generation_responses:
            slot = self._slots.get(response.uid)
            if slot is not None:
                with self._isolated(slot.handle, "handling a generated token"):
                    self._on_token(slot, response)

    def _fail_broken(self):
        """Fail the requests whose sampler or processors raised in this step."""
        for slot in [s for s in self._slots.values() if s.errors]:
            self._fail_request(slot.handle, slot.errors[0], "sampling")

    def _save_checkpoint(self, slot: _Slot):
        """Keep the KV state at the end of the system prompt for new conversations."""
        extracted = self._generator.extract_cache([slot.uid]).get(slot.uid)
        slot.checkpoint_len = 0
        if extracted:
            cache, tokens = extracted
            self._insert_for(slot.handle, list(tokens), cache, checkpoint=True)

    def _on_token(self, slot: _Slot, response):
        fault = slot.handle.fault
        faults.check(fault, "hang")
        now = time.perf_counter()
        if slot.first_token_at is None:
            slot.first_token_at = now
            slot.usage.prompt_ms = (now - slot.started) * 1000
        if slot.handle.request.logprobs and not slot.stop.is_eos(response.token):
            faults.check(fault, "logprobs")
            slot.logprobs.append(logprob_entry(
                self._token_bytes, response.token, response.logprobs,
                slot.handle.request.top_logprobs))
        faults.check(fault, "detokenize")
        slot.generated.append(response.token)
        delta = slot.stop.add(response.token)
        slot.usage.completion_tokens = slot.stop.generated
        slot.usage.generation_ms = (now - slot.first_token_at) * 1000
        faults.check(fault, "stop")
        if slot.stop.reason is None and response.finish_reason is None:
            faults.check(fault, "parse")
            self._emit(slot, *slot.parser.feed(delta))
            return
        if slot.stop.reason is None:  # the generator's own budget; the rule's should match
            slot.stop.end(response.finish_reason, "the batch generator")
        if slot.spec is not None:
            cache, tokens = self._end_speculation(slot)
        elif response.finish_reason is None:  # ended here, not by the generator: take it out
            removed = self._generator.remove([slot.uid], return_prompt_caches=True)
            cache, tokens = removed.get(slot.uid, (None, None))
        else:
            cache, tokens = response.prompt_cache, response.all_tokens
        self._finish(slot, delta, cache, tokens)

    def _emit(self, slot: _Slot, content: str, reasoning: str):
        slot.content += content
        slot.reasoning += reasoning
        if content or reasoning:
            slot.handle.events.put(Delta(content, reasoning, slot.parser.enabled,
                                         dataclasses.replace(slot.usage)))

    def _finish(self, slot: _Slot, delta: str, cache, tokens):
        del self._slots[slot.uid]  # out of the batch already; a fault below fails only it
        faults.check(slot.handle.fault, "finish")
        self._insert_for(slot.handle, tokens, cache)
        content, reasoning = slot.parser.feed(delta)
        tail_content, tail_reasoning = slot.parser.finish()
        # A tool call the model wrote malformed goes back as text, never lost.
        tail_content += slot.parser.rejected_text()
        self._emit(slot, content + tail_content, reasoning + tail_reasoning)
        usage, stop = slot.usage, slot.stop
        log.info("request %s: finished (%s: %s), %d tokens at %.1f tok/s%s",
                 slot.handle.request.correlation_id or slot.uid, stop.reason, stop.cause,
                 usage.completion_tokens,
                 usage.completion_tokens / max(usage.generation_ms / 1000, 1e-9),
                 f", {slot.drafted} drafted, {slot.accepted} accepted" if slot.drafted else "")
        self.last_metrics = {
            "tokens_generated": usage.completion_tokens,
            "prompt_tokens_processed": usage.prompt_tokens - usage.cached_tokens,
            "tokens_per_second": (usage.completion_tokens / (usage.generation_ms / 1000)
                                  if usage.generation_ms > 0 else 0.0),
            "drafted_tokens": slot.drafted,
            "accepted_tokens": slot.accepted,
        }
        slot.handle.events.put(Done(
            text=slot.content, reasoning=slot.reasoning, tool_calls=slot.parser.tool_calls(),
            structured=slot.parser.enabled, finish_reason=stop.reason, usage=usage,
            logprobs=slot.logprobs if slot.handle.request.logprobs else None))


def _close_quietly(slot: "_Slot"):
    """Stop a request's speculation, if any; it is being failed anyway."""
    if slot.spec is not None:
        try:
            slot.spec.close()
        except Exception:  # nothing to save from a request that is failing
            log.exception("closing a speculation failed")
        slot.spec = None


class _Response:
    """A generated token as the batch generator reports it, for a request
    decoded outside the batch."""

    def __init__(self, token: int, logprobs):
        self.token, self.logprobs = token, logprobs
        self.finish_reason = self.prompt_cache = self.all_tokens = None


def _fault_processor(stage: str):
    """A logits processor that raises on its second call (fault injection)."""
    calls = []

    def process(tokens, logits):
        calls.append(1)
        if len(calls) > 1:
            faults.check(stage, "decode")
        return logits
    return process
