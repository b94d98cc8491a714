"""Keeping every rank's engine in lockstep with MLX collectives.

Before each engine step rank 0 shares what changed since the last one (new
requests with their tokens and sampling parameters, cancellations, load and
free, shutdown) as one "tick"; every rank then applies the same tick and runs
the same batch step, so the batch, the prompt cache and every request's
sampler evolve identically everywhere. This is how mlx-lm's own server
shares requests: `all_sum` of the pickled bytes (workers add zeros).

Each tick also carries a digest of every rank's engine state, so a rank that
diverged is named at once instead of corrupting the next collective.

An idle group parks: MLX's ring backend polls its sockets while a collective
waits, so a worker sitting in the next tick would keep a core busy for as long
as the server is idle. Instead rank 0 shares a "park" op, and workers sleep
until rank 0 sends a wake-up byte on their liveness link before its next tick
(ring only: JACCL ranks have no such link, so an idle JACCL group keeps ticking).
"""

import threading

import logging
import pickle
import time
from typing import List, Optional

import mlx.core as mx
import numpy as np

log = logging.getLogger(__name__)


class Diverged(RuntimeError):
    """A rank's engine state no longer matches rank 0's."""


class Lockstep:
    """Rank 0 shares ticks; workers receive them. Counts what it sends."""

    def __init__(self, group, config, links=None):
        self.group = group
        self.config = config
        self.links = links or {}  # rank -> open liveness link (see group.watch_links)
        self.wakes = threading.Semaphore(0)  # a worker's wake-ups from rank 0, counted
        self.parked = False  # rank 0: the workers sleep until `wake`
        self.rank = group.rank()
        self.size = group.size()
        self.ticks = 0
        self.bytes = 0  # tick bytes moved through collectives, all ticks
        self.seconds = 0.0  # time spent in tick collectives, all ticks
        # The engine's stream: the batch generator evaluates the next step
        # asynchronously, and a tick on another stream would interleave its
        # collectives with that step's in a different order on each rank.
        self.stream = mx.cpu

    def _all_sum(self, array: np.ndarray) -> np.ndarray:
        result = mx.distributed.all_sum(mx.array(array), group=self.group, stream=self.stream)
        return np.array(result)

    def exchange(self, ops: Optional[list], digest: int) -> list:
        """Rank 0 passes its ops, workers None; everyone gets rank 0's ops.
        Raises `Diverged` when any rank's digest differs from rank 0's."""
        started = time.perf_counter()
        payload = pickle.dumps(ops, protocol=pickle.HIGHEST_PROTOCOL) if ops else b""
        header = np.zeros(2 + self.size, dtype=np.int64)
        header[0] = len(payload) if self.rank == 0 else 0
        header[1] = 1  # every rank adds one: fewer means a rank was lost mid-sum
        header[2 + self.rank] = digest
        header = self._all_sum(header)
        size, present, digests = int(header[0]), int(header[1]), [int(d) for d in header[2:]]
        if present != self.size:
            raise RuntimeError(f"a rank was lost during the exchange ({present} of "
                               f"{self.size} answered)")
        ops_out: list = ops or []  # rank 0 keeps its own; workers unpickle rank 0's
        if size:
            data = np.frombuffer(payload, dtype=np.uint8) if self.rank == 0 \
                else np.zeros(size, dtype=np.uint8)
            received = self._all_sum(data)
            if self.rank != 0:
                ops_out = pickle.loads(received.tobytes())
        self.ticks += 1
        self.bytes += header.nbytes + size
        self.seconds += time.perf_counter() - started
        behind = [rank for rank, d in enumerate(digests) if d != digests[0]]
        if behind:
            raise Diverged(f"{', '.join(self.config.describe(r) for r in behind)} diverged "
                           "from rank 0 (engine state digest differs)")
        return ops_out

    def agree(self, message: str, limit: int = 2048) -> List[str]:
        """Every rank's message (empty = fine), e.g. why its load failed."""
        data = np.zeros((self.size, limit), dtype=np.uint8)
        raw = message.encode("utf-8", "replace")[:limit]
        data[self.rank, :len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        gathered = self._all_sum(data)
        return [bytes(row).rstrip(b"\0").decode("utf-8", "replace") for row in gathered]

    def wake(self):
        """Rank 0: wake the parked workers for the next tick."""
        for link in self.links.values():
            link.sendall(b"w")
        self.parked = False

    def stats(self) -> dict:
        return {"ranks": self.size, "ticks": self.ticks, "tick_bytes": self.bytes,
                "tick_us": int(self.seconds * 1e6)}
