"""A thread-safe LRU container of prompt (KV) caches, keyed by token sequences.

Most chat requests repeat a long prefix (system prompt, tool list, earlier
turns). Keeping finished KV caches keyed by the tokens they hold, and handing
the nearest one to the next request, means only the new tokens have to be
processed. Lookups follow LocalAI's prompt-cache rules:

* exact match   -> the stored cache, ``remaining == []``;
* shorter match -> the longest stored strict prefix of the request (length >= 2:
  a one-token prefix saves nothing), ``remaining`` = the tokens after it;
* longer match  -> only when there is no usable prefix: a deep copy of a stored
  cache that shares a prefix with the request, trimmed back to that common
  prefix (never past ``len(tokens) - 1``); the stored entry stays;
* no match      -> ``(None, tokens)``.

Served exact/shorter entries are handed over for exclusive use: an entry holds a
count of how many times its sequence was inserted; serving it at count 1 removes
it, at a higher count decrements the count and returns a deep copy. Two callers
therefore never share one mutable cache object.

The container is deliberately opaque about what a cache is: it never imports
MLX, copies with :func:`copy.deepcopy`, and reaches the cache only through the
optional ``can_trim_fn`` / ``trim_fn`` / ``nbytes_fn`` hooks, so the tests can
use plain Python objects.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

__all__ = ["ThreadSafeLRUPromptCache"]

Key = Tuple[Hashable, Tuple[Any, ...]]


class _Entry:
    """One stored cache: the object, how many inserts it stands for, its size."""

    __slots__ = ("prompt_cache", "count", "nbytes", "tick")

    def __init__(self, prompt_cache: Any, nbytes: int, tick: int):
        self.prompt_cache = prompt_cache
        self.count = 1
        self.nbytes = nbytes
        # Last-use stamp; breaks ties between equally good "longer" candidates
        # in favour of the most recently used one.
        self.tick = tick


class _Node:
    """A trie node: children by token id, and the entry stored at this depth."""

    __slots__ = ("children", "entry")

    def __init__(self) -> None:
        self.children: Dict[Any, _Node] = {}
        self.entry: Optional[_Entry] = None


class ThreadSafeLRUPromptCache:
    """LRU prompt cache with one trie per model, safe to share between threads.

    ``max_size`` bounds the number of entries (distinct token sequences, across
    all models). ``max_bytes`` optionally bounds the bytes held, measured once
    per insert by ``nbytes_fn(prompt_cache)``. ``can_trim_fn(cache) -> bool``
    and ``trim_fn(cache, n)`` (trim ``n`` tokens off the end, in place) enable
    "longer" matches; without both, none is ever served.

    Hooks are called while the internal lock may be held (except ``nbytes_fn``
    and ``trim_fn``), so they must not call back into the cache.
    """

    def __init__(
        self,
        max_size: int = 10,
        can_trim_fn: Optional[Callable[[Any], bool]] = None,
        trim_fn: Optional[Callable[[Any, int], Any]] = None,
        *,
        max_bytes: Optional[int] = None,
        nbytes_fn: Optional[Callable[[Any], int]] = None,
    ):
        self.max_size = max_size
        self.max_bytes = max_bytes
        self._can_trim_fn = can_trim_fn
        self._trim_fn = trim_fn
        self._nbytes_fn = nbytes_fn
        self._lock = threading.Lock()
        self._tries: Dict[Hashable, _Node] = {}
        # (model, tuple(tokens)) -> entry, least recently used first.
        self._lru: "OrderedDict[Key, _Entry]" = OrderedDict()
        self._bytes = 0
        self._tick = 0
        self._stats = dict.fromkeys(
            ("hits_exact", "hits_shorter", "hits_longer", "misses", "evictions", "inserts"),
            0,
        )

    # ------------------------------------------------------------------ public

    def fetch_nearest_cache(self, model: Hashable, tokens: Sequence[Any]) -> Tuple[Any, List[Any]]:
        """Return ``(cache or None, remaining_tokens)`` for the nearest stored cache."""
        tokens = list(tokens)
        trim_job = None
        with self._lock:
            found = self._find(model, tokens)
            if found is None:
                self._stats["misses"] += 1
                return None, tokens
            kind, key, entry, keep = found
            if kind == "longer":
                # The stored entry stays; the caller gets a private copy trimmed
                # back to the usable prefix (the trim happens outside the lock).
                self._stats["hits_longer"] += 1
                self._touch(key, entry)
                cache = copy.deepcopy(entry.prompt_cache)
                trim_job = len(key[1]) - keep
            else:
                self._stats["hits_exact" if kind == "exact" else "hits_shorter"] += 1
                cache = self._hand_out(key, entry)
        if trim_job is not None:
            self._trim_fn(cache, trim_job)
        return cache, tokens[keep:]

    def insert_cache(self, model: Hashable, tokens: Sequence[Any], prompt_cache: Any) -> None:
        """Store ``prompt_cache`` under ``tokens`` (or bump the count of that key).

        Re-inserting an existing sequence keeps the stored object (the caller's
        new one is dropped) and increments its count. An empty sequence is
        ignored: it holds no KV state worth serving. An object larger than
        ``max_bytes`` on its own is not kept; it is counted as an eviction.
        """
        tokens = tuple(tokens)
        if not tokens:
            return
        # Measure outside the lock: it may walk a large structure.
        nbytes = int(self._nbytes_fn(prompt_cache)) if self._nbytes_fn is not None else 0
        with self._lock:
            self._stats["inserts"] += 1
            if self.max_bytes is not None and nbytes > self.max_bytes:
                self._stats["evictions"] += 1
                return
            key = (model, tokens)
            entry = self._lru.get(key)
            if entry is not None:
                entry.count += 1
            else:
                entry = _Entry(prompt_cache, nbytes, 0)
                node = self._tries.setdefault(model, _Node())
                for tok in tokens:
                    node = node.children.setdefault(tok, _Node())
                node.entry = entry
                self._lru[key] = entry
                self._bytes += nbytes
            self._touch(key, entry)
            self._enforce_bounds()

    def clear(self) -> None:
        """Drop every entry of every model (statistics counters are kept)."""
        with self._lock:
            self._tries.clear()
            self._lru.clear()
            self._bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._lru)

    @property
    def nbytes(self) -> int:
        """Total bytes held, as measured by ``nbytes_fn`` at insert time."""
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

    def _find(self, model: Hashable, tokens: List[Any]):
        """Pick the match the contract asks for.

        Returns ``None`` or ``(kind, key, entry, keep)`` where ``keep`` is how
        many request tokens the served cache covers.
        """
        node = self._tries.get(model)
        if node is None or not tokens:
            return None
        depth = 0
        best_prefix = 0  # length of the longest stored strict-or-full prefix
        best_entry = None
        for tok in tokens:
            child = node.children.get(tok)
            if child is None:
                break
            node = child
            depth += 1
            if node.entry is not None:
                best_prefix, best_entry = depth, node.entry
        if best_entry is not None and best_prefix == len(tokens):
            return "exact", (model, tuple(tokens)), best_entry, len(tokens)
        if best_entry is not None and best_prefix > 1:
            return "shorter", (model, tuple(tokens[:best_prefix])), best_entry, best_prefix

        # Longer match: entries strictly below the deepest matched node share
        # exactly `depth` tokens with the request (no entry shares more).
        if self._can_trim_fn is None or self._trim_fn is None:
            return None
        keep = min(depth, len(tokens) - 1)
        if keep < 1:
            return None
        candidate = self._best_extension(node, tokens[:depth])
        if candidate is None:
            return None
        suffix, entry = candidate
        return "longer", (model, tuple(tokens[:depth]) + suffix), entry, keep

    def _best_extension(self, node: _Node, prefix: List[Any]):
        """The trimmable entry strictly below ``node`` that is cheapest to serve.

        Cheapest means shortest (least to copy and trim); ties go to the most
        recently used entry.
        """
        best = None
        best_rank = None
        stack = [(child, (tok,)) for tok, child in node.children.items()]
        while stack:
            cur, suffix = stack.pop()
            if cur.entry is not None and self._can_trim_fn(cur.entry.prompt_cache):
                rank = (len(suffix), -cur.entry.tick)
                if best_rank is None or rank < best_rank:
                    best, best_rank = (suffix, cur.entry), rank
            for tok, child in cur.children.items():
                stack.append((child, suffix + (tok,)))
        return best

    def _hand_out(self, key: Key, entry: _Entry) -> Any:
        """Give an exact/shorter entry to the caller for exclusive use."""
        if entry.count > 1:
            entry.count -= 1
            self._touch(key, entry)
            return copy.deepcopy(entry.prompt_cache)
        self._remove(key)
        return entry.prompt_cache

    def _touch(self, key: Key, entry: _Entry) -> None:
        """Mark an entry most recently used."""
        self._lru.move_to_end(key)
        self._tick += 1
        entry.tick = self._tick

    def _enforce_bounds(self) -> None:
        """Evict least recently used entries until both budgets hold."""
        while self._lru and (
            len(self._lru) > self.max_size
            or (self.max_bytes is not None and self._bytes > self.max_bytes)
        ):
            key = next(iter(self._lru))
            self._remove(key)
            self._stats["evictions"] += 1

    def _remove(self, key: Key) -> _Entry:
        """Unlink an entry from the LRU and its trie, pruning empty branches."""
        entry = self._lru.pop(key)
        self._bytes -= entry.nbytes
        model, tokens = key
        root = self._tries[model]
        path = [root]
        for tok in tokens:
            path.append(path[-1].children[tok])
        path[-1].entry = None
        # Walk back up, dropping nodes that no longer lead to any entry.
        for depth in range(len(tokens), 0, -1):
            node = path[depth]
            if node.entry is not None or node.children:
                break
            del path[depth - 1].children[tokens[depth - 1]]
        if not root.children:
            del self._tries[model]
        return entry
