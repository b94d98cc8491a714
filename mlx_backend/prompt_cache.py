"""A thread-safe LRU container of prompt (KV) caches, keyed by token sequences.

Most chat requests repeat a long prefix (system prompt, tool list, earlier
turns). Keeping finished KV caches keyed by the tokens they hold, and handing
the nearest one to the next request, means only the new tokens have to be
processed. Lookups follow LocalAI's prompt-cache rules:

* exact match   -> the stored cache, ``remaining == []``;
* shorter match -> the longest stored strict prefix of the request (length >= 2:
  a one-token prefix saves nothing), ``remaining`` = the tokens after it;
* longer match  -> only when there is no usable prefix: a copy of a stored
  cache that shares a prefix with the request, cut back to that common prefix
  (never past ``len(tokens) - 1``, and at least ``min_longer_keep`` tokens);
  the stored entry stays;
* no match      -> ``(None, tokens)``.

Served exact/shorter entries are handed over for exclusive use: an entry holds a
count of how many times its sequence was inserted; serving it at count 1 removes
it, at a higher count decrements the count and returns a copy. Two callers
therefore never share one mutable cache object. A *pinned* entry (a checkpoint
such as a system prompt, which every new conversation starts from) is always
served as a copy and stays.

Lookups cost O(len(request)) per stored entry and never depend on how long the
stored sequences are: each entry keeps its tokens as one numpy array, and the
common prefix with the request is found by a vectorised comparison of at most
``len(request)`` tokens. Bookkeeping is a few bytes per token, and with
``count_keys`` it is counted in the byte budget with the caches themselves.

The container is deliberately opaque about what a cache is: it never imports
MLX and reaches the cache only through the optional ``can_trim_fn`` /
``trim_fn`` / ``slice_fn`` / ``nbytes_fn`` hooks (copies default to
:func:`copy.deepcopy`), so the tests can use plain Python objects.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["ThreadSafeLRUPromptCache", "ENTRY_OVERHEAD_BYTES"]

# Python objects behind one entry (entry, LRU slot, dict slots, array header),
# counted per entry when `count_keys` is on; measured with tracemalloc.
ENTRY_OVERHEAD_BYTES = 600


class _Entry:
    """One stored cache: the object, its tokens, how many inserts it stands for."""

    __slots__ = ("prompt_cache", "key", "tokens", "count", "nbytes", "tick", "pinned")

    def __init__(self, prompt_cache: Any, key: bytes, nbytes: int, pinned: bool):
        self.prompt_cache = prompt_cache
        self.key = key  # the tokens as int64 bytes: the dict key, and (viewed) the array
        self.tokens = np.frombuffer(key, dtype=np.int64)
        self.count = 1
        self.nbytes = nbytes
        # Last-use stamp; breaks ties between equally good "longer" candidates
        # in favour of the most recently used one.
        self.tick = 0
        self.pinned = pinned


def _as_array(tokens: Sequence[Any]) -> np.ndarray:
    array = np.asarray(tokens, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError("tokens must be a flat sequence of integers")
    return array


def _common_prefix(stored: np.ndarray, request: np.ndarray) -> int:
    """How many leading tokens two sequences share.

    Compared in blocks that double in size, so the cost follows the shared
    prefix (a few microseconds for sequences that part early), never the
    length of the longer one.
    """
    n = min(len(stored), len(request))
    start, block = 0, 64
    while start < n:
        stop = min(start + block, n)
        same = stored[start:stop] == request[start:stop]
        if not same.all():
            return start + int(same.argmin())
        start, block = stop, block * 2
    return n


class ThreadSafeLRUPromptCache:
    """LRU prompt cache shared between threads, for any number of models.

    ``max_size`` bounds the number of entries (distinct token sequences, across
    all models). ``max_bytes`` optionally bounds the bytes held: what
    ``nbytes_fn(prompt_cache)`` measures once per insert, plus, with
    ``count_keys``, the entry's own bookkeeping (its tokens and a fixed
    overhead). ``can_trim_fn(cache) -> bool`` with ``trim_fn(cache, n)``
    (trim ``n`` tokens off the end, in place) or ``slice_fn(cache, keep) ->
    new cache`` (the first ``keep`` positions, copying only those) enable
    "longer" matches; without them none is ever served. ``slice_fn(cache,
    len)`` also copies whole entries, when given.

    Hooks are called while the internal lock may be held (except ``nbytes_fn``),
    so they must not call back into the cache. Copies are taken under the
    lock (for MLX arrays a slice is a lazy view, cheap to take).
    """

    def __init__(
        self,
        max_size: int = 10,
        can_trim_fn: Optional[Callable[[Any], bool]] = None,
        trim_fn: Optional[Callable[[Any, int], Any]] = None,
        *,
        max_bytes: Optional[int] = None,
        nbytes_fn: Optional[Callable[[Any], int]] = None,
        slice_fn: Optional[Callable[[Any, int], Any]] = None,
        min_longer_keep: int = 1,
        count_keys: bool = False,
    ):
        self.max_size = max_size
        self.max_bytes = max_bytes
        self.min_longer_keep = max(1, min_longer_keep)
        self._can_trim_fn = can_trim_fn
        self._trim_fn = trim_fn
        self._slice_fn = slice_fn
        self._nbytes_fn = nbytes_fn
        self._count_keys = count_keys
        self._lock = threading.Lock()
        # model -> {token bytes -> entry}
        self._models: Dict[Hashable, Dict[bytes, _Entry]] = {}
        # (model, token bytes) -> entry, least recently used first.
        self._lru: "OrderedDict[Tuple[Hashable, bytes], _Entry]" = OrderedDict()
        self._bytes = 0
        self._tick = 0
        self._stats = dict.fromkeys(
            ("hits_exact", "hits_shorter", "hits_longer", "misses", "evictions", "inserts",
             "tokens_saved"),
            0,
        )

    # ------------------------------------------------------------------ public

    def fetch_nearest_cache(self, model: Hashable, tokens: Sequence[Any]) -> Tuple[Any, List[Any]]:
        """Return ``(cache or None, remaining_tokens)`` for the nearest stored cache."""
        tokens = list(tokens)
        request = _as_array(tokens)
        with self._lock:
            found = self._find(model, request)
            if found is None:
                self._stats["misses"] += 1
                return None, tokens
            kind, entry, keep = found
            self._stats["tokens_saved"] += keep
            if kind == "longer":
                # The stored entry stays; the caller gets a private copy of
                # the usable prefix. It is taken under the lock, so no other
                # caller can be handed the original meanwhile.
                self._stats["hits_longer"] += 1
                self._touch(model, entry)
                return self._prefix_copy(entry, keep), tokens[keep:]
            self._stats["hits_exact" if kind == "exact" else "hits_shorter"] += 1
            return self._hand_out(model, entry), tokens[keep:]

    def insert_cache(self, model: Hashable, tokens: Sequence[Any], prompt_cache: Any,
                     pinned: bool = False) -> None:
        """Store ``prompt_cache`` under ``tokens`` (or bump the count of that key).

        Re-inserting an existing sequence keeps the stored object (the caller's
        new one is dropped) and increments its count; ``pinned`` marks a
        checkpoint that is served as a copy and stays. An empty sequence is
        ignored: it holds no KV state worth serving. An object larger than
        ``max_bytes`` on its own is not kept; it is counted as an eviction.
        """
        array = _as_array(tokens)
        if not len(array):
            return
        # Measure outside the lock: it may walk a large structure.
        nbytes = int(self._nbytes_fn(prompt_cache)) if self._nbytes_fn is not None else 0
        if self._count_keys:
            nbytes += array.nbytes + ENTRY_OVERHEAD_BYTES
        key = array.tobytes()
        with self._lock:
            self._stats["inserts"] += 1
            if self.max_bytes is not None and nbytes > self.max_bytes:
                self._stats["evictions"] += 1
                return
            entries = self._models.setdefault(model, {})
            entry = entries.get(key)
            if entry is not None:
                entry.count += 1
                entry.pinned = entry.pinned or pinned
            else:
                entry = entries[key] = _Entry(prompt_cache, key, nbytes, pinned)
                self._lru[(model, key)] = entry
                self._bytes += nbytes
            self._touch(model, entry)
            self._enforce_bounds()

    def clear(self) -> None:
        """Drop every entry of every model (statistics counters are kept)."""
        with self._lock:
            self._models.clear()
            self._lru.clear()
            self._bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._lru)

    def keys(self) -> List[Tuple[Hashable, Tuple[int, ...]]]:
        """``(model, tokens)`` of every entry, least recently used first."""
        with self._lock:
            return [(model, tuple(e.tokens.tolist())) for (model, _), e in self._lru.items()]

    def count(self, model: Hashable, tokens: Sequence[Any]) -> int:
        """How many inserts the entry for ``tokens`` stands for (0: none)."""
        with self._lock:
            entry = self._models.get(model, {}).get(_as_array(tokens).tobytes())
            return entry.count if entry is not None else 0

    @property
    def nbytes(self) -> int:
        """Total bytes held, as measured at insert time."""
        with self._lock:
            return self._bytes

    def stats(self) -> Dict[str, Any]:
        """A snapshot of sizes and lifetime counters."""
        with self._lock:
            out: Dict[str, Any] = dict(self._stats)
            out.update(
                entries=len(self._lru),
                bytes=self._bytes,
                max_size=self.max_size,
                max_bytes=self.max_bytes,
            )
            return out

    # --------------------------------------------------------------- internals
    # Everything below runs with self._lock held.

    def _find(self, model: Hashable, request: np.ndarray):
        """Pick the match the contract asks for.

        Returns ``None`` or ``(kind, entry, keep)`` where ``keep`` is how many
        request tokens the served cache covers.
        """
        entries = self._models.get(model)
        n = len(request)
        if not entries or not n:
            return None
        exact = entries.get(request.tobytes())
        if exact is not None:
            return "exact", exact, n
        prefix, prefix_len = None, 0  # the longest stored strict prefix
        depth, extensions = 0, []  # the deepest shared prefix, and entries reaching past it
        for entry in entries.values():
            common = _common_prefix(entry.tokens, request)
            if common == len(entry.tokens):  # a strict prefix of the request
                if common > prefix_len:
                    prefix, prefix_len = entry, common
                continue
            if common > depth:
                depth, extensions = common, [entry]
            elif common == depth and common:
                extensions.append(entry)
        if prefix is not None and prefix_len > 1:
            return "shorter", prefix, prefix_len
        if not self._can_slice() or prefix_len > depth:
            return None  # nothing reaches past the deepest shared prefix
        keep = min(depth, n - 1)
        if keep < self.min_longer_keep:
            return None
        # Entries strictly below the deepest shared prefix; the cheapest to
        # serve is the shortest, ties going to the most recently used.
        candidates = [e for e in extensions if self._can_trim_fn(e.prompt_cache)]
        if not candidates:
            return None
        best = min(candidates, key=lambda e: (len(e.tokens), -e.tick))
        return "longer", best, keep

    def _can_slice(self) -> bool:
        return self._can_trim_fn is not None and (
            self._trim_fn is not None or self._slice_fn is not None)

    def _hand_out(self, model: Hashable, entry: _Entry) -> Any:
        """Give an exact/shorter entry to the caller for exclusive use."""
        if entry.count > 1 or entry.pinned:
            if not entry.pinned:
                entry.count -= 1
            self._touch(model, entry)
            return self._copy(entry)
        self._remove(model, entry)
        return entry.prompt_cache

    def _copy(self, entry: _Entry) -> Any:
        if self._slice_fn is not None:
            return self._slice_fn(entry.prompt_cache, len(entry.tokens))
        return copy.deepcopy(entry.prompt_cache)

    def _prefix_copy(self, entry: _Entry, keep: int) -> Any:
        """The first ``keep`` positions of a stored cache: sliced when the
        caller gave a slice hook (copies only what is kept), else a deep copy
        trimmed back."""
        if self._slice_fn is not None:
            return self._slice_fn(entry.prompt_cache, keep)
        cache = copy.deepcopy(entry.prompt_cache)
        self._trim_fn(cache, len(entry.tokens) - keep)
        return cache

    def _touch(self, model: Hashable, entry: _Entry) -> None:
        """Mark an entry most recently used."""
        self._lru.move_to_end((model, entry.key))
        self._tick += 1
        entry.tick = self._tick

    def _enforce_bounds(self) -> None:
        """Evict least recently used entries until both budgets hold."""
        while self._lru and (
            len(self._lru) > self.max_size
            or (self.max_bytes is not None and self._bytes > self.max_bytes)
        ):
            (model, _), entry = next(iter(self._lru.items()))
            self._remove(model, entry)
            self._stats["evictions"] += 1

    def _remove(self, model: Hashable, entry: _Entry) -> None:
        key = entry.key
        del self._lru[(model, key)]
        entries = self._models[model]
        del entries[key]
        if not entries:
            del self._models[model]
        self._bytes -= entry.nbytes
