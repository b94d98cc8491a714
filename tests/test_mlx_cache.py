"""Tests for mlx_cache.ThreadSafeLRUPromptCache: the lookup rules in its docstring.

Caches here are plain Python objects: the container must not care what it holds.
"""

import itertools
import random
import sys
import threading

from hypothesis import given, settings, strategies as st

from mlx_cache import ThreadSafeLRUPromptCache

_uids = itertools.count()


class Payload:
    """A stand-in KV cache: the tokens it 'holds', a unique id, a taken flag."""

    def __init__(self, tokens, trimmable=True, size=None):
        self.uid = next(_uids)
        self.tokens = list(tokens)
        self.trimmable = trimmable
        self.size = len(self.tokens) if size is None else size
        self.taken = False

    def __repr__(self):
        return f"Payload(uid={self.uid}, tokens={self.tokens})"


def can_trim(p):
    return p.trimmable


def trim(p, n):
    del p.tokens[len(p.tokens) - n :]


class RecordingTrim:
    def __init__(self):
        self.calls = []

    def __call__(self, p, n):
        self.calls.append((p, n))
        trim(p, n)


def make(max_size=10, hooks=True, **kw):
    if hooks:
        return ThreadSafeLRUPromptCache(max_size, can_trim, trim, **kw)
    return ThreadSafeLRUPromptCache(max_size, **kw)


def check_internal_accounting(cache):
    """Per-model tables, LRU and byte counter describe the same set of entries."""
    reachable = {}
    for model, entries in cache._models.items():
        assert entries, f"empty table left for {model!r}"
        for key, entry in entries.items():
            assert entry.key == key and entry.tokens.tobytes() == key
            reachable[(model, key)] = entry
    assert set(reachable) == set(cache._lru)
    assert all(reachable[k] is cache._lru[k] for k in reachable)
    assert len(cache) == len(reachable)
    assert cache.nbytes == sum(e.nbytes for e in reachable.values())
    assert all(e.count >= 1 for e in reachable.values())
    stats = cache.stats()
    assert stats["entries"] == len(reachable)
    assert stats["bytes"] == cache.nbytes


def lru(cache):
    """(model, tokens) of every entry, least recently used first."""
    return cache.keys()


# --------------------------------------------------------------- match kinds


def test_exact_match_returns_entry_and_no_remaining():
    cache = make()
    p = Payload([1, 2, 3])
    cache.insert_cache("m", [1, 2, 3], p)
    got, remaining = cache.fetch_nearest_cache("m", [1, 2, 3])
    assert got is p
    assert remaining == []


def test_shorter_match_longest_prefix_wins():
    cache = make()
    cache.insert_cache("m", [1, 2], Payload([1, 2]))
    p = Payload([1, 2, 3, 4])
    cache.insert_cache("m", [1, 2, 3, 4], p)
    cache.insert_cache("m", [1, 2, 3, 9], Payload([1, 2, 3, 9]))
    got, remaining = cache.fetch_nearest_cache("m", [1, 2, 3, 4, 5, 6])
    assert got is p
    assert remaining == [5, 6]
    # the shorter one is still there and now the best prefix
    got2, remaining2 = cache.fetch_nearest_cache("m", [1, 2, 3, 4, 5, 6])
    assert got2.tokens == [1, 2]
    assert remaining2 == [3, 4, 5, 6]


def test_one_token_prefix_is_not_served():
    cache = make(hooks=False)
    cache.insert_cache("m", [7], Payload([7]))
    got, remaining = cache.fetch_nearest_cache("m", [7, 8, 9])
    assert got is None
    assert remaining == [7, 8, 9]
    assert len(cache) == 1  # still stored, and still served on an exact match
    got, remaining = cache.fetch_nearest_cache("m", [7])
    assert got.tokens == [7] and remaining == []


def test_one_token_prefix_does_not_hide_longer_candidates():
    rec = RecordingTrim()
    cache = ThreadSafeLRUPromptCache(10, can_trim, rec)
    cache.insert_cache("m", [1], Payload([1]))
    stored = Payload([1, 2, 3, 4])
    cache.insert_cache("m", [1, 2, 3, 4], stored)
    got, remaining = cache.fetch_nearest_cache("m", [1, 2, 3, 9])
    assert got.tokens == [1, 2, 3]
    assert remaining == [9]
    assert rec.calls == [(got, 1)]


def test_longer_match_trims_copy_to_common_prefix():
    rec = RecordingTrim()
    cache = ThreadSafeLRUPromptCache(10, can_trim, rec)
    stored = Payload([1, 2, 3, 4, 5])
    cache.insert_cache("m", [1, 2, 3, 4, 5], stored)
    got, remaining = cache.fetch_nearest_cache("m", [1, 2, 3, 8, 9])
    assert got is not stored
    assert got.uid == stored.uid  # a deep copy of it
    assert got.tokens == [1, 2, 3]
    assert remaining == [8, 9]
    assert rec.calls == [(got, 2)]
    # the stored entry stays, untouched
    assert len(cache) == 1
    assert stored.tokens == [1, 2, 3, 4, 5]
    again, rem = cache.fetch_nearest_cache("m", [1, 2, 3, 4, 5])
    assert again is stored and rem == []


def test_longer_match_never_trims_past_len_minus_one():
    rec = RecordingTrim()
    cache = ThreadSafeLRUPromptCache(10, can_trim, rec)
    stored = Payload([1, 2, 3, 4, 5])
    cache.insert_cache("m", [1, 2, 3, 4, 5], stored)
    # the request is a strict prefix of the stored sequence
    got, remaining = cache.fetch_nearest_cache("m", [1, 2, 3])
    assert got.tokens == [1, 2]
    assert remaining == [3]
    assert rec.calls == [(got, 3)]
    assert stored.tokens == [1, 2, 3, 4, 5]


def test_longer_match_with_no_usable_prefix_is_a_miss():
    rec = RecordingTrim()
    cache = ThreadSafeLRUPromptCache(10, can_trim, rec)
    cache.insert_cache("m", [1, 2, 3], Payload([1, 2, 3]))
    # one-token request: len(tokens) - 1 == 0 tokens could be reused
    assert cache.fetch_nearest_cache("m", [1]) == (None, [1])
    assert rec.calls == []


def test_longer_match_prefers_shortest_then_most_recent():
    cache = make()
    cache.insert_cache("m", [1, 2, 5, 6, 7], Payload([1, 2, 5, 6, 7]))
    cache.insert_cache("m", [1, 2, 3, 4], Payload([1, 2, 3, 4]))
    b = Payload([1, 2, 8, 9])
    cache.insert_cache("m", [1, 2, 8, 9], b)
    got, remaining = cache.fetch_nearest_cache("m", [1, 2, 0])
    assert got.uid == b.uid and got.tokens == [1, 2]
    assert remaining == [0]


def test_longer_match_skips_untrimmable_entries():
    cache = make()
    cache.insert_cache("m", [1, 2, 3], Payload([1, 2, 3], trimmable=False))
    assert cache.fetch_nearest_cache("m", [1, 2, 9]) == (None, [1, 2, 9])
    ok = Payload([1, 2, 3, 4])
    cache.insert_cache("m", [1, 2, 3, 4], ok)
    got, remaining = cache.fetch_nearest_cache("m", [1, 2, 9])
    assert got.uid == ok.uid and remaining == [9]


def test_shorter_match_is_preferred_over_longer():
    cache = make()
    short = Payload([1, 2])
    cache.insert_cache("m", [1, 2], short)
    cache.insert_cache("m", [1, 2, 3, 4, 5], Payload([1, 2, 3, 4, 5]))
    got, remaining = cache.fetch_nearest_cache("m", [1, 2, 3, 4, 9])
    assert got is short
    assert remaining == [3, 4, 9]


def test_no_trim_hooks_means_no_longer_match():
    for hooks in [(None, None), (can_trim, None), (None, trim)]:
        cache = ThreadSafeLRUPromptCache(10, *hooks)
        cache.insert_cache("m", [1, 2, 3, 4], Payload([1, 2, 3, 4]))
        assert cache.fetch_nearest_cache("m", [1, 2, 3, 9]) == (None, [1, 2, 3, 9])
        assert cache.fetch_nearest_cache("m", [1, 2]) == (None, [1, 2])


def test_no_match():
    cache = make()
    assert cache.fetch_nearest_cache("m", [1, 2, 3]) == (None, [1, 2, 3])
    cache.insert_cache("m", [4, 5, 6], Payload([4, 5, 6]))
    assert cache.fetch_nearest_cache("m", [1, 2, 3]) == (None, [1, 2, 3])
    assert cache.fetch_nearest_cache("m", []) == (None, [])
    assert cache.stats()["misses"] == 3


def test_remaining_is_a_list_for_any_sequence_input():
    cache = make()
    cache.insert_cache("m", (1, 2), Payload([1, 2]))
    got, remaining = cache.fetch_nearest_cache("m", (1, 2, 3))
    assert got is not None and remaining == [3] and isinstance(remaining, list)


def test_empty_insert_is_ignored():
    cache = make()
    cache.insert_cache("m", [], Payload([]))
    assert len(cache) == 0
    assert cache._models == {}


# ----------------------------------------------------------------- ownership


def test_count_one_entry_is_handed_over_and_removed():
    cache = make()
    p = Payload([1, 2, 3])
    cache.insert_cache("m", [1, 2, 3], p)
    got, _ = cache.fetch_nearest_cache("m", [1, 2, 3, 4])
    assert got is p
    assert len(cache) == 0
    assert cache.fetch_nearest_cache("m", [1, 2, 3, 4]) == (None, [1, 2, 3, 4])
    check_internal_accounting(cache)


def test_count_two_entry_gives_copy_then_original():
    cache = make()
    p = Payload([1, 2, 3])
    cache.insert_cache("m", [1, 2, 3], p)
    cache.insert_cache("m", [1, 2, 3], Payload([1, 2, 3]))  # dropped, count -> 2
    assert len(cache) == 1
    assert cache.count("m", (1, 2, 3)) == 2
    first, _ = cache.fetch_nearest_cache("m", [1, 2, 3])
    assert first is not p and first.uid == p.uid
    assert cache.count("m", (1, 2, 3)) == 1
    first.tokens.append(99)  # the copy is private: the stored one is unaffected
    second, _ = cache.fetch_nearest_cache("m", [1, 2, 3])
    assert second is p and p.tokens == [1, 2, 3]
    assert len(cache) == 0
    assert cache.fetch_nearest_cache("m", [1, 2, 3]) == (None, [1, 2, 3])


# ----------------------------------------------------------------------- LRU


def test_eviction_past_max_size_drops_least_recently_used():
    cache = make(max_size=2)
    cache.insert_cache("m", [1, 1], Payload([1, 1]))
    cache.insert_cache("m", [2, 2], Payload([2, 2]))
    cache.insert_cache("m", [3, 3], Payload([3, 3]))
    assert len(cache) == 2
    assert set(lru(cache)) == {("m", (2, 2)), ("m", (3, 3))}
    assert cache.stats()["evictions"] == 1
    check_internal_accounting(cache)


def test_fetch_refreshes_recency():
    cache = make(max_size=2)
    cache.insert_cache("m", [1, 1], Payload([1, 1]))
    cache.insert_cache("m", [1, 1], Payload([1, 1]))  # count 2: survives a fetch
    cache.insert_cache("m", [2, 2], Payload([2, 2]))
    cache.fetch_nearest_cache("m", [1, 1])  # [1, 1] is now most recent
    cache.insert_cache("m", [3, 3], Payload([3, 3]))
    assert set(lru(cache)) == {("m", (1, 1)), ("m", (3, 3))}


def test_longer_fetch_refreshes_recency():
    cache = make(max_size=2)
    cache.insert_cache("m", [1, 2, 3], Payload([1, 2, 3]))
    cache.insert_cache("m", [5, 5], Payload([5, 5]))
    got, _ = cache.fetch_nearest_cache("m", [1, 2, 9])
    assert got is not None
    cache.insert_cache("m", [6, 6], Payload([6, 6]))
    assert set(lru(cache)) == {("m", (1, 2, 3)), ("m", (6, 6))}


def test_reinsert_refreshes_recency():
    cache = make(max_size=2)
    cache.insert_cache("m", [1, 1], Payload([1, 1]))
    cache.insert_cache("m", [2, 2], Payload([2, 2]))
    cache.insert_cache("m", [1, 1], Payload([1, 1]))
    cache.insert_cache("m", [3, 3], Payload([3, 3]))
    assert set(lru(cache)) == {("m", (1, 1)), ("m", (3, 3))}


# --------------------------------------------------------- models, clear, len


def test_models_are_separate_namespaces():
    cache = make()
    a = Payload([1, 2, 3])
    cache.insert_cache("a", [1, 2, 3], a)
    assert cache.fetch_nearest_cache("b", [1, 2, 3]) == (None, [1, 2, 3])
    assert cache.fetch_nearest_cache(("b", 1), [1, 2, 3, 4]) == (None, [1, 2, 3, 4])
    b = Payload([1, 2, 3])
    cache.insert_cache("b", [1, 2, 3], b)
    assert len(cache) == 2
    assert cache.fetch_nearest_cache("b", [1, 2, 3])[0] is b
    assert cache.fetch_nearest_cache("a", [1, 2, 3])[0] is a


def test_len_counts_entries_across_models_not_inserts():
    cache = make()
    assert len(cache) == 0
    cache.insert_cache("a", [1, 2], Payload([1, 2]))
    cache.insert_cache("a", [1, 2], Payload([1, 2]))
    cache.insert_cache("a", [1, 2, 3], Payload([1, 2, 3]))
    cache.insert_cache("b", [1, 2], Payload([1, 2]))
    assert len(cache) == 3


def test_clear_drops_everything():
    cache = make(nbytes_fn=lambda p: p.size)
    cache.insert_cache("a", [1, 2], Payload([1, 2]))
    cache.insert_cache("b", [3, 4, 5], Payload([3, 4, 5]))
    cache.clear()
    assert len(cache) == 0
    assert cache.nbytes == 0
    assert cache.fetch_nearest_cache("a", [1, 2]) == (None, [1, 2])
    assert cache.fetch_nearest_cache("b", [3, 4, 5, 6]) == (None, [3, 4, 5, 6])
    check_internal_accounting(cache)
    cache.insert_cache("a", [1, 2], Payload([1, 2]))
    assert len(cache) == 1


# --------------------------------------------------------------- byte budget


def test_byte_budget_evicts_least_recently_used():
    cache = make(max_size=100, max_bytes=10, nbytes_fn=lambda p: p.size)
    cache.insert_cache("m", [1, 1], Payload([1, 1], size=4))
    cache.insert_cache("m", [2, 2], Payload([2, 2], size=4))
    assert cache.nbytes == 8
    cache.insert_cache("m", [3, 3], Payload([3, 3], size=4))
    assert set(lru(cache)) == {("m", (2, 2)), ("m", (3, 3))}
    assert cache.nbytes == 8
    cache.insert_cache("m", [4, 4], Payload([4, 4], size=10))
    assert set(lru(cache)) == {("m", (4, 4))}
    assert cache.nbytes == 10
    assert cache.stats()["evictions"] == 3
    check_internal_accounting(cache)


def test_oversized_entry_is_not_kept():
    cache = make(max_bytes=10, nbytes_fn=lambda p: p.size)
    cache.insert_cache("m", [1, 1], Payload([1, 1], size=4))
    cache.insert_cache("m", [2, 2], Payload([2, 2], size=11))
    assert set(lru(cache)) == {("m", (1, 1))}
    assert cache.nbytes == 4
    assert cache.stats()["evictions"] == 1
    assert cache.fetch_nearest_cache("m", [2, 2]) == (None, [2, 2])
    check_internal_accounting(cache)


def test_nbytes_measured_once_per_insert():
    calls = []

    def nbytes(p):
        calls.append(p.uid)
        return p.size

    cache = make(max_bytes=100, nbytes_fn=nbytes)
    a, b = Payload([1, 2]), Payload([1, 2])
    cache.insert_cache("m", [1, 2], a)
    cache.insert_cache("m", [1, 2], b)
    cache.fetch_nearest_cache("m", [1, 2])
    cache.fetch_nearest_cache("m", [1, 2])
    assert calls == [a.uid, b.uid]


def test_bytes_consistent_after_hand_outs_and_evictions():
    cache = make(max_size=3, max_bytes=12, nbytes_fn=lambda p: p.size)
    assert cache.nbytes == 0
    cache.insert_cache("m", [1, 2], Payload([1, 2], size=5))
    cache.insert_cache("m", [1, 2], Payload([1, 2], size=5))  # count 2, same bytes
    assert cache.nbytes == 5
    cache.insert_cache("m", [3, 4], Payload([3, 4], size=5))
    cache.fetch_nearest_cache("m", [1, 2])  # copy, count 1: bytes unchanged
    assert cache.nbytes == 10
    cache.fetch_nearest_cache("m", [1, 2])  # handed over: bytes released
    assert cache.nbytes == 5
    cache.insert_cache("m", [5, 6], Payload([5, 6], size=5))
    cache.insert_cache("m", [7, 8], Payload([7, 8], size=5))  # evicts [3, 4]
    assert cache.nbytes == 10
    assert set(lru(cache)) == {("m", (5, 6)), ("m", (7, 8))}
    check_internal_accounting(cache)


def test_nbytes_is_zero_without_nbytes_fn():
    cache = make()
    cache.insert_cache("m", [1, 2], Payload([1, 2]))
    assert cache.nbytes == 0
    assert cache.stats()["bytes"] == 0


# --------------------------------------------------------------------- stats


def test_stats_counters():
    cache = make(max_size=2)
    cache.insert_cache("m", [1, 2, 3], Payload([1, 2, 3]))
    cache.insert_cache("m", [1, 2, 3], Payload([1, 2, 3]))
    cache.insert_cache("m", [4, 5, 6, 7], Payload([4, 5, 6, 7]))
    cache.fetch_nearest_cache("m", [1, 2, 3])  # exact
    cache.fetch_nearest_cache("m", [1, 2, 3, 4])  # shorter
    cache.fetch_nearest_cache("m", [4, 5, 9])  # longer
    cache.fetch_nearest_cache("m", [9, 9])  # miss
    cache.insert_cache("m", [8, 8], Payload([8, 8]))
    cache.insert_cache("m", [9, 9], Payload([9, 9]))  # evicts [4, 5, 6, 7]
    s = cache.stats()
    for key in ("entries", "bytes", "hits_exact", "hits_shorter", "hits_longer", "misses", "evictions"):
        assert key in s
    assert s["entries"] == 2
    assert s["hits_exact"] == 1
    assert s["hits_shorter"] == 1
    assert s["hits_longer"] == 1
    assert s["misses"] == 1
    assert s["evictions"] == 1
    assert s["inserts"] == 5


# ------------------------------------------------------------------- threads


def test_threaded_hammer_no_double_hand_out():
    max_size = 12
    cache = ThreadSafeLRUPromptCache(
        max_size, can_trim, trim, max_bytes=40, nbytes_fn=lambda p: p.size
    )
    seen_lock = threading.Lock()
    seen_ids = set()
    keep_alive = []  # keeps handed-out objects alive so ids stay unique
    errors = []
    n_threads, n_ops = 8, 2000
    fetches = [0] * n_threads

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(n_ops):
                model = rng.choice("ab")
                tokens = [rng.randrange(3) for _ in range(rng.randint(1, 5))]
                if rng.random() < 0.5:
                    cache.insert_cache(model, tokens, Payload(tokens, size=rng.randint(1, 8)))
                else:
                    fetches[seed] += 1
                    got, remaining = cache.fetch_nearest_cache(model, tokens)
                    if got is not None:
                        assert not got.taken, "a handed-out object was served again"
                        got.taken = True
                        assert got.tokens + remaining == tokens
                        with seen_lock:
                            assert id(got) not in seen_ids, "same object handed out twice"
                            seen_ids.add(id(got))
                            keep_alive.append(got)
                    else:
                        assert remaining == tokens
                assert len(cache) <= max_size
                assert cache.nbytes <= 40
        except BaseException as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often so races would show
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert not errors, errors[0]
    check_internal_accounting(cache)
    s = cache.stats()
    assert s["hits_exact"] + s["hits_shorter"] + s["hits_longer"] > 0
    assert s["hits_exact"] + s["hits_shorter"] + s["hits_longer"] + s["misses"] == sum(fetches)
    assert s["inserts"] == n_threads * n_ops - sum(fetches)


# ------------------------------------------------------ reference comparison


class Reference:
    """The contract written as plainly as possible: a dict and an LRU list."""

    def __init__(self, max_size, max_bytes):
        self.max_size, self.max_bytes = max_size, max_bytes
        self.entries = {}  # (model, tokens) -> [payload, count, nbytes]
        self.lru = []  # least recently used first

    def _touch(self, key):
        if key in self.lru:
            self.lru.remove(key)
        self.lru.append(key)

    def _drop(self, key):
        self.lru.remove(key)
        return self.entries.pop(key)

    def insert(self, model, tokens, payload):
        tokens = tuple(tokens)
        if not tokens or (self.max_bytes is not None and payload.size > self.max_bytes):
            return
        key = (model, tokens)
        if key in self.entries:
            self.entries[key][1] += 1
        else:
            self.entries[key] = [payload, 1, payload.size]
        self._touch(key)
        while len(self.lru) > self.max_size or (
            self.max_bytes is not None and self.nbytes() > self.max_bytes
        ):
            self._drop(self.lru[0])

    def nbytes(self):
        return sum(e[2] for e in self.entries.values())

    def fetch(self, model, tokens):
        """Returns (kind, (uid, tokens) of the served cache or None, remaining)."""
        tokens = tuple(tokens)
        mine = [k for m, k in self.entries if m == model]
        if tokens and tokens in mine:
            return self._serve(model, tokens, "exact", len(tokens), tokens)
        prefixes = [k for k in mine if 1 < len(k) < len(tokens) and tokens[: len(k)] == k]
        if prefixes:
            k = max(prefixes, key=len)
            return self._serve(model, k, "shorter", len(k), tokens)

        def lcp(k):
            n = 0
            while n < min(len(k), len(tokens)) and k[n] == tokens[n]:
                n += 1
            return n

        if mine and tokens:
            depth = max(lcp(k) for k in mine)
            keep = min(depth, len(tokens) - 1)
            cands = [
                k
                for k in mine
                if lcp(k) == depth and len(k) > depth and self.entries[(model, k)][0].trimmable
            ]
            if keep >= 1 and cands:
                k = min(cands, key=lambda k: (len(k), -self.lru.index((model, k))))
                payload = self.entries[(model, k)][0]
                self._touch((model, k))
                return "longer", (payload.uid, list(k[:keep])), list(tokens[keep:])
        return "miss", None, list(tokens)

    def _serve(self, model, k, kind, keep, tokens):
        key = (model, k)
        payload, count, _ = self.entries[key]
        if count > 1:
            self.entries[key][1] -= 1
            self._touch(key)
        else:
            self._drop(key)
        return kind, (payload.uid, list(payload.tokens)), list(tokens[keep:])


token_lists = st.lists(st.integers(0, 2), min_size=0, max_size=5)
operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("insert"),
            st.sampled_from("ab"),
            token_lists,
            st.booleans(),
            st.integers(1, 6),
        ),
        st.tuples(st.just("fetch"), st.sampled_from("ab"), token_lists),
        st.tuples(st.just("clear")),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(
    ops=operations,
    max_size=st.integers(0, 6),
    max_bytes=st.one_of(st.none(), st.integers(0, 15)),
)
def test_matches_reference_model(ops, max_size, max_bytes):
    cache = ThreadSafeLRUPromptCache(
        max_size, can_trim, trim, max_bytes=max_bytes, nbytes_fn=lambda p: p.size
    )
    ref = Reference(max_size, max_bytes)
    kinds = {"exact": "hits_exact", "shorter": "hits_shorter", "longer": "hits_longer", "miss": "misses"}
    expected_counts = dict.fromkeys(kinds.values(), 0)
    for op in ops:
        if op[0] == "insert":
            _, model, tokens, trimmable, size = op
            payload = Payload(tokens, trimmable=trimmable, size=size)
            cache.insert_cache(model, tokens, payload)
            ref.insert(model, tokens, payload)
        elif op[0] == "fetch":
            _, model, tokens = op
            got, remaining = cache.fetch_nearest_cache(model, tokens)
            kind, want, want_remaining = ref.fetch(model, tokens)
            expected_counts[kinds[kind]] += 1
            assert remaining == want_remaining
            if want is None:
                assert got is None
            else:
                assert (got.uid, got.tokens) == want
                assert got.tokens + remaining == list(tokens)
        else:
            cache.clear()
            ref.entries.clear()
            ref.lru.clear()
        assert lru(cache) == ref.lru
        assert {k: cache.count(*k) for k in lru(cache)} == {
            k: v[1] for k, v in ref.entries.items()
        }
        assert cache.nbytes == ref.nbytes()
        assert len(cache) == len(ref.entries)
    check_internal_accounting(cache)
    stats = cache.stats()
    for name, n in expected_counts.items():
        assert stats[name] == n


# ------------------------------------------------------------ at scale


def test_pinned_checkpoint_is_copied_and_stays():
    cache = make()
    checkpoint = Payload([1, 2, 3])
    cache.insert_cache("m", [1, 2, 3], checkpoint, pinned=True)
    for conversation in range(5):
        got, rest = cache.fetch_nearest_cache("m", [1, 2, 3, 10 + conversation])
        assert got is not checkpoint and got.uid == checkpoint.uid and rest == [10 + conversation]
        got.tokens.append(99)  # private: the stored checkpoint is unaffected
    assert checkpoint.tokens == [1, 2, 3] and len(cache) == 1
    assert cache.stats()["hits_shorter"] == 5 and cache.stats()["tokens_saved"] == 15


def test_longer_match_slices_only_the_kept_prefix():
    sliced = []

    def slice_fn(p, keep):
        sliced.append(keep)
        return Payload(p.tokens[:keep])

    cache = ThreadSafeLRUPromptCache(10, can_trim, None, slice_fn=slice_fn)
    cache.insert_cache("m", list(range(100)), Payload(range(100)))
    got, rest = cache.fetch_nearest_cache("m", [0, 1, 2, 7])
    assert sliced == [3] and got.tokens == [0, 1, 2] and rest == [7]
    assert len(cache) == 1  # the stored entry stays


def test_a_longer_match_keeping_too_little_is_a_miss():
    cache = ThreadSafeLRUPromptCache(10, can_trim, trim, min_longer_keep=2)
    cache.insert_cache("m", [1, 2, 3], Payload([1, 2, 3]))
    assert cache.fetch_nearest_cache("m", [1, 9]) == (None, [1, 9])
    got, rest = cache.fetch_nearest_cache("m", [1, 2, 9])
    assert got.tokens == [1, 2] and rest == [9]


def test_bookkeeping_counts_in_the_byte_budget():
    from mlx_backend.prompt_cache import ENTRY_OVERHEAD_BYTES

    cache = ThreadSafeLRUPromptCache(100, max_bytes=10**6, nbytes_fn=lambda p: 0,
                                     count_keys=True)
    cache.insert_cache("m", list(range(1000)), Payload([]))
    assert cache.nbytes == 1000 * 8 + ENTRY_OVERHEAD_BYTES


def test_memory_held_stays_within_the_budget():
    """Python heap growth (tokens, entries, tables), measured: not just the number reported."""
    import tracemalloc

    budget = 8 * 2**20
    cache = ThreadSafeLRUPromptCache(1000, max_bytes=budget, nbytes_fn=lambda p: 0,
                                     count_keys=True)
    rng = random.Random(0)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for n in range(200):
            tokens = [rng.randrange(50000) for _ in range(8000)]
            cache.insert_cache("m", tokens, None)
            del tokens
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert cache.nbytes <= budget
    assert held <= budget * 1.1, held
    assert cache.stats()["evictions"] > 0


def test_entry_overhead_covers_what_an_entry_costs():
    """ENTRY_OVERHEAD_BYTES is a measurement, kept honest here."""
    import tracemalloc

    from mlx_backend.prompt_cache import ENTRY_OVERHEAD_BYTES

    cache = ThreadSafeLRUPromptCache(10000)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for n in range(1000):
            cache.insert_cache(n % 7, [n, n + 1], None)
        per_entry = (tracemalloc.get_traced_memory()[0] - base) / 1000 - 2 * 8
    finally:
        tracemalloc.stop()
    assert per_entry <= ENTRY_OVERHEAD_BYTES, per_entry
