"""4. Health latency while streams decode: LocalAI polls Health to decide the
backend is alive, so a busy engine must not starve it. Sampled during the
scaling runs (scaling.py), every 20 ms on a channel of its own."""

import threading
import time
from typing import List

import grpc

import backend_pb2
import backend_pb2_grpc
from common import ms, percentile

H = backend_pb2.HealthMessage()
KEYS = ("health_p50_ms", "health_p95_ms", "health_p99_ms", "health_max_ms", "health_samples")


class HealthPoller:
    """Poll Health every `interval` seconds on its own channel; keep (time, latency)."""

    def __init__(self, addr: str, interval: float = 0.02):
        self.interval = interval
        self.samples: List[tuple] = []
        self.failures = 0
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(addr)
        self._stub = backend_pb2_grpc.BackendStub(self._channel)
        self._stub.Health(H, timeout=10)  # connect before timing
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                self._stub.Health(H, timeout=10)
                t1 = time.perf_counter()
                self.samples.append((t0, t1 - t0))
            except grpc.RpcError:
                self.failures += 1
                t1 = time.perf_counter()
            self._stop.wait(max(0.0, self.interval - (t1 - t0)))

    def between(self, start: float, end: float) -> List[float]:
        return [lat for t, lat in self.samples if start <= t <= end]

    def stop(self):
        self._stop.set()
        self._thread.join(15)
        self._channel.close()


def latency(lat) -> dict:
    """Percentiles (ms) of Health latencies sampled during one level's runs."""
    return {
        "health_p50_ms": ms(percentile(lat, 50)),
        "health_p95_ms": ms(percentile(lat, 95)),
        "health_p99_ms": ms(percentile(lat, 99)),
        "health_max_ms": ms(max(lat) if lat else None),
        "health_samples": len(lat),
    }


def record(session, levels: dict, poller: HealthPoller):
    """The health measurement: latencies at 16 streams against the target."""
    h = session.m("health")
    h.update({k: levels["16"][k] for k in KEYS})
    h["failures"] = poller.failures
    h["pass"] = h["health_p95_ms"] is not None and h["health_p95_ms"] < 50
