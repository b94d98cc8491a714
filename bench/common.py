"""Progress logging and the statistics every phase reports with.

Nothing in bench/ outside raw_worker.py imports MLX: the bench process only
talks gRPC, so it adds no MLX threads (or a GPU context) next to the server it
measures.
"""

import statistics
import sys
import time


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def percentile(values, q: float):
    """Nearest-rank-interpolated percentile (q in [0, 100])."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    pos = (len(values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def ms(seconds):
    return None if seconds is None else seconds * 1000
