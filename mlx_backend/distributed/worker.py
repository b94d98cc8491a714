"""A worker rank: `run.sh --worker --backend ring --hostfile H --rank N`.

This is what `local-ai worker mlx-distributed` runs. The worker waits for
rank 0 (the gRPC server) to join, then runs the same engine as rank 0 in
lockstep: every model, request and cancellation comes from rank 0's ticks.
It exits when rank 0 stops it (exit code 0) or is gone (exit code 1).
"""

import logging
import os
import signal
import threading

from ..errors import BackendError
from .group import GroupConfig, join
from .lockstep import Lockstep

log = logging.getLogger(__name__)


def serve(hostfile: str = "", backend: str = "", rank=None, coordinator: str = "") -> int:
    try:
        config = GroupConfig.for_worker(hostfile, backend, rank, coordinator)
    except BackendError as err:
        log.error("%s", err.message)
        return 2
    stopping = threading.Event()
    joined = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %d: worker stopping", signum)
        if joined.is_set():  # rank 0 sees the lost peer and reports it
            logging.shutdown()
            os._exit(0)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        group, links = join(config, stopping=stopping.is_set)
    except BackendError as err:
        log.error("%s", err.message)
        return 1
    if group is None:
        return 0
    joined.set()
    from ..engine import Engine

    engine = Engine(lockstep=Lockstep(group, config, links))
    while not stopping.wait(0.5):
        if engine.failure:
            log.error("worker %s exits: %s", config.describe(config.rank), engine.failure)
            return 1
        if engine.stopped:
            log.info("worker %s: rank 0 stopped the group", config.describe(config.rank))
            return 0
    return 0
