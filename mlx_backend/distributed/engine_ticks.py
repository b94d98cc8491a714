"""The engine's side of lockstep: what rank 0 collects and shares before each
step, and how every rank applies it (see `lockstep` for the wire).

`Engine` inherits this. Rank 0 checks each new request, call and cancellation
on its engine thread (`_collect`), decides what only it can decide (the
prompt-cache prefix, the seed of an unseeded request, whether the model still
matches), and shares the result; every rank then applies the same ops in the
same order (`_apply`) and runs the same batch step. Workers rebuild each
request from plain data (`_worker_handle`) and answer nobody: rank 0 does.
"""

import concurrent.futures
import dataclasses
import logging
import queue
import random
import time
import zlib

import mlx.core as mx

from ..errors import Cancelled, FailedPrecondition, InvalidArgument, Unavailable
from ..events import POLL_SECONDS, Failed, RequestHandle
from ..kv_cache import cache_nbytes, default_cache_bytes
from ..model_loader import LoadError, LoadedModel
from ..options import ModelSettings, parse_options
from ..request import LoadRequest
from .group import GroupConfig, describe_loss, join, watch_links
from .lockstep import Diverged, Lockstep
from .sharding import choose_parallel, shard_model

log = logging.getLogger(__name__)


def check_load(request: LoadRequest, settings: ModelSettings):
    """What distributed mode cannot do, refused on every rank before anything
    is unloaded."""
    if request.draft_model or settings.prompt_lookup:
        raise InvalidArgument("speculative decoding (DraftModel, prompt_lookup) is not "
                              "available in distributed mode")
    if settings.prompt_cache_path:
        raise InvalidArgument("prompt_cache_path is not available in distributed mode: each "
                              "rank holds only its share of the KV cache")


class _Discard:
    """A worker's event queue: rank 0 answers the caller, so events go nowhere."""

    def put(self, event):
        pass


class TickingEngine:
    """Mixed into `Engine`: its distributed side (a no-op until `_lockstep` is set)."""

    def _joins_group(self, item) -> bool:
        """Join the group a distributed LoadModel names (rank 0, first time);
        the load then waits in `_pending` for the first tick."""
        _, _, (request,), future, _ = item
        try:

            settings = parse_options(request.options)
            config = GroupConfig.for_rank0(settings.hostfile, settings.distributed_backend)
            if config is None:
                return False
            with self._working_on("joining the distributed group", bounded=False):
                group, links = join(config, timeout=settings.join_timeout)
        except BaseException as err:  # the load fails; the server keeps serving
            self.load_error = str(err)
            future.set_exception(err)
            return True
        self._lockstep = Lockstep(group, config, links)
        self._watch_ranks()
        self._pending.append(item)
        return True

    def _watch_ranks(self):
        watch_links(self._lockstep.links, self._rank_lost, self._lockstep.wakes.release)

    def _rank_lost(self, rank: int):
        """A rank's process is gone (its liveness link closed): fail now, even
        if a collective is still waiting on it. A worker first gives rank 0's
        last tick (a stop) a moment to arrive."""
        time.sleep(1.0)
        if self._stop or self.failure is not None:
            return
        lockstep = self._lockstep
        reason = (f"worker {lockstep.config.describe(rank)} is gone (its connection closed)"
                  if lockstep.rank == 0 else "rank 0 is gone (its connection closed)")
        self._declare_failed(reason)

    def _tick(self) -> bool:
        """Share this step's changes (rank 0) or receive them (workers), then
        apply them; False once the group has failed or was told to stop."""
        lockstep = self._lockstep
        if self.failure is not None:  # a rank is gone: no more collectives
            self._fail_all(Unavailable(f"{self.failure}; restart the backend and its workers"))
            self._stop = True
            return False
        lockstep.stream = self._stream
        ops, local = self._collect() if lockstep.rank == 0 else (None, [])
        if lockstep.rank == 0 and lockstep.parked and not ops:
            return True  # idle: nothing to share, the workers sleep
        try:
            with self._working_on("sharing a step with the workers"):
                if lockstep.rank == 0 and lockstep.parked:
                    lockstep.wake()
                mx.synchronize(self._stream)  # the step in flight first: ticks time only themselves
                ops = lockstep.exchange(ops, self._digest())
        except Exception as err:  # a lost peer, or a rank that diverged
            self._group_failed(err)
            for mine in local:  # collected, never applied: answer them too
                error = Unavailable(f"the engine failed ({self.failure}); restart the backend")
                if isinstance(mine, concurrent.futures.Future):
                    mine.set_exception(error)
                elif mine is not None:
                    mine.events.put(Failed(error))
            return False
        try:
            for index, op in enumerate(ops):
                if not self._apply(op, local[index] if local else None):
                    return False
        except Exception as err:  # outside any one request: the ranks may disagree now
            self._group_failed(err)
            return False
        return True

    def _apply(self, op: tuple, mine) -> bool:
        """Apply one shared op on this rank (`mine`: rank 0's handle or future);
        False after a stop."""
        if op[0] == "generate":
            handle = mine or self._worker_handle(op[1])
            with self._isolated(handle, "admitting the request"):
                self._admit(handle, expected_cached=op[2])
        elif op[0] == "cancel":
            self._drop_cancelled(set(op[1]))
        elif op[0] == "call":
            self._shared_call(op[1], op[2], mine)
        elif op[0] == "stop":
            self._stop = True
            if mine is not None:
                mine.set_result(None)
            return False
        elif op[0] == "park":
            self._park()
        return True

    def _park(self):
        """Idle: rank 0 shares nothing until work comes; workers sleep until
        rank 0 wakes them (or is gone)."""
        lockstep = self._lockstep
        if lockstep.rank == 0:
            lockstep.parked = True
            return
        while not lockstep.wakes.acquire(timeout=POLL_SECONDS):
            if self.failure is not None or self._stop:
                return

    def _collect(self):
        """Rank 0: this tick's ops from the inbox, each checked here first so
        that every rank applies it alike. Requests come first, then the
        cancellations, then at most one call (or stop), which ends the tick;
        `local` holds rank 0's side of each op (a handle or a future)."""
        ops, local, last = [], [], None
        block = not self._slots
        while last is None:
            try:
                item = self._pending.popleft() if self._pending else self._inbox.get(
                    block=block, timeout=POLL_SECONDS if block else None)
            except queue.Empty:
                break
            block = False
            if item[0] == "generate":
                with self._count_lock:
                    self._queued -= 1
                handle = item[1]
                with self._isolated(handle, "admitting the request"):
                    ops.append(("generate",) + self._share_request(handle))
                    local.append(handle)
            elif item[0] == "call":
                op = self._share_call(item)
                last = (op, item[3]) if op is not None else None
            elif item[0] == "stop":
                last = (("stop",), item[1])
        cancelled = [uid for uid, slot in self._slots.items() if slot.handle.cancelled]
        if cancelled:
            ops.append(("cancel", cancelled))
            local.append(None)
        if last is not None:
            ops.append(last[0])
            local.append(last[1])
        lockstep = self._lockstep
        if not ops and not self._slots and not lockstep.parked \
                and len(lockstep.links) == lockstep.size - 1:  # wake-ups need the links
            ops, local = [("park",)], [None]
        return ops, local

    def _share_request(self, handle: RequestHandle):
        """Check a new request on rank 0 and decide its prompt-cache lookup:
        (the request as workers rebuild it, the cached prefix length)."""
        if handle.cancelled:
            raise Cancelled("cancelled before it started")
        self._require_loaded(handle.loaded)
        request = handle.request
        if request.cache_path:
            raise FailedPrecondition("PromptCachePath is not available in distributed mode: "
                                     "each rank holds only its share of the KV cache")
        if request.sampling.seed is None and not request.sampling.greedy:
            # Every rank must draw the same tokens: rank 0 picks the seed.
            handle.request = request = dataclasses.replace(request, sampling=dataclasses.replace(
                request.sampling, seed=random.getrandbits(63)))
        handle.prefetched = self.fetch_cache(request.prompt_tokens)
        cached = len(request.prompt_tokens) - len(handle.prefetched[1])
        grammar = request.grammar
        wire = dataclasses.replace(request, grammar=None)
        return (wire, (grammar.kind, grammar.grammar) if grammar is not None else None), cached

    def _worker_handle(self, shared) -> RequestHandle:
        """A worker's copy of a request: same tokens, sampler and grammar; its
        events go nowhere (rank 0 answers the caller)."""
        request, grammar = shared
        if grammar is not None:
            spec = self._grammars.get(grammar)
            if spec is None:
                from ..grammar import _compile
                if len(self._grammars) > 64:
                    self._grammars.clear()
                spec = self._grammars[grammar] = _compile(*grammar, self.loaded.tokenizer,
                                                          "Grammar")
            request = dataclasses.replace(request, grammar=spec)
        handle = RequestHandle(request, self.loaded)
        handle.events = _Discard()
        return handle

    _SHARED_CALLS = ("_load", "_unload", "_score", "_embed")

    def _share_call(self, item):
        """A call's op for the tick, or None when it runs on rank 0 alone (or
        failed its checks here, and was answered)."""
        _, fn, args, future, bounded = item
        name = getattr(fn, "__name__", "")
        try:
            if name not in self._SHARED_CALLS:
                with self._working_on(name or "a call", bounded):
                    future.set_result(fn(*args))
                return None
            if name == "_load":
                (request,) = args
                settings = parse_options(request.options)
                config = GroupConfig.for_rank0(settings.hostfile, settings.distributed_backend)
                if config is not None and config.hostfile != self._lockstep.config.hostfile:
                    raise FailedPrecondition(
                        f"this server already serves the group of {self._lockstep.config.hostfile};"
                        " restart it to use another hostfile")
                if settings.cache_bytes is None:  # every rank budgets as rank 0 does
                    request = dataclasses.replace(request, options=list(request.options) + [
                        f"cache_bytes:{default_cache_bytes()}"])
                return ("call", name, (request,))
            if name in ("_score", "_embed"):
                self._require_loaded(args[0])
                return ("call", name, args[1:-1])
            return ("call", name, args)
        except BaseException as err:  # answered to the caller; nothing is shared
            future.set_exception(err)
            return None

    def _shared_call(self, name: str, args: tuple, future):
        """Run a shared call on every rank; a load that fails anywhere fails everywhere."""
        fn = getattr(self, name)
        if name in ("_score", "_embed"):
            args = (self.loaded,) + tuple(args) + (lambda: False,)
        result = error = None
        with self._working_on(name, bounded=name != "_load"):
            try:
                result = fn(*args)
            except BaseException as err:
                error = err
            if name == "_load":
                why = "" if error is None else (str(error) or type(error).__name__)
                failed = [(rank, message) for rank, message
                          in enumerate(self._lockstep.agree(why)) if message]
                if failed and error is None:
                    self._unload("another rank could not load the model")
                    error = LoadError("; ".join(
                        f"{self._lockstep.config.describe(rank)}: {message}"
                        for rank, message in failed))
                    self.load_error = str(error)
        if future is not None:
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def _digest(self) -> int:
        """What every rank's engine must agree on before each tick."""
        cache = self.prompt_cache
        state = (sorted((uid, len(slot.generated), slot.generated[-1:])
                        for uid, slot in self._slots.items()),
                 self.loaded is not None, len(cache) if cache is not None else -1,
                 cache.nbytes if cache is not None else -1)
        return zlib.crc32(repr(state).encode())

    def _group_failed(self, err: Exception):
        """A collective failed: every waiting caller hears UNAVAILABLE naming
        the rank, and this rank serves no more."""

        lockstep = self._lockstep
        if self.failure is not None:  # already known, e.g. which rank's link closed
            reason = self.failure
        elif isinstance(err, Diverged):
            reason = str(err)
        elif lockstep.rank == 0:
            reason = f"{describe_loss(lockstep.config, lockstep.size)} ({err})"
        else:
            reason = f"rank 0 is gone ({err})"
        log.error("distributed group failed: %s", reason)
        self._fail_all(Unavailable(f"{reason}; restart the backend and its workers"))
        self._declare_failed(reason)
        self._stop = True

    def _shard_for(self, settings: ModelSettings):
        """In distributed mode, what splits the model across the ranks before
        its weights are read: tensor or pipeline parallel (`parallel` option)."""
        if self._lockstep is None:
            return None
        group = self._lockstep.group

        def shard(model):
            parallel = choose_parallel(model, group.size(), settings.parallel)
            shard_model(model, group, parallel)
            self.parallel = parallel
            log.info("rank %d of %d: %s parallel, %d of the model's layers here", group.rank(),
                     group.size(), parallel, len(model.layers))
        return shard

    def _cache_bytes_fn(self, loaded: LoadedModel):
        """Prompt-cache bytes of an entry. In distributed mode every rank must
        count the same (its evictions must match rank 0's), so each counts the
        whole model's KV from its own share: layers are alike, and tensor
        parallel gives every rank an equal part of each layer."""
        if self._lockstep is None:
            return cache_nbytes
        local = len(loaded.model.layers)
        total = getattr(getattr(loaded.model, "args", None), "num_hidden_layers", local) or local
        ranks = self._lockstep.size if self.parallel == "tensor" else 1
        return lambda cache: cache_nbytes(cache) * total * ranks // max(local, 1)
