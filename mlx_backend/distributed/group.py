"""Joining an `mx.distributed` group the way LocalAI's mlx-distributed workers do.

Rank 0 is the gRPC server; it joins when LoadModel names a hostfile (option
`hostfile`, or MLX_DISTRIBUTED_HOSTFILE). Workers are `run.sh --worker
--backend ring|jaccl --hostfile H --rank N` and wait for rank 0.

MLX's ring init blocks without a timeout and holds the GIL, so nobody calls
it until every rank is known to be there: each worker answers a short knock
on its own ring address (only from rank 0's host, as the hostfile says), and
rank 0 knocks on every worker with a deadline before calling `init`. A worker
that never comes then fails LoadModel with a message naming it, instead of
hanging the server. The knock's connection then stays open as a liveness
link: when a rank's process dies its end closes, and the other side knows at
once which rank it was, even while a collective waits on it.
"""

import dataclasses
import ipaddress
import json
import logging
import os
import socket
import time
from typing import List, Optional

from ..errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

BACKENDS = ("ring", "jaccl")
KNOCK = b"mlx-backend join\n"
READY = b"ready\n"
GO = b"go\n"  # every worker answered: init now (a partial group never calls init)


@dataclasses.dataclass
class GroupConfig:
    """Where a rank finds its group: the hostfile, the backend and its rank."""

    hostfile: str
    backend: str = "ring"
    rank: int = 0
    coordinator: str = ""  # JACCL's coordinator IP:PORT

    @classmethod
    def for_worker(cls, hostfile: str = "", backend: str = "", rank: Optional[int] = None,
                   coordinator: str = "") -> "GroupConfig":
        """A worker's settings: the flags, else LocalAI's environment names."""
        env = os.environ
        config = cls(hostfile=hostfile or env.get("MLX_DISTRIBUTED_HOSTFILE", ""),
                     backend=backend or env.get("MLX_DISTRIBUTED_BACKEND", "ring"),
                     rank=rank if rank is not None else int(env.get("MLX_RANK", "-1")),
                     coordinator=coordinator or env.get("MLX_JACCL_COORDINATOR", ""))
        if not config.hostfile:
            raise InvalidArgument("a worker needs --hostfile (or MLX_DISTRIBUTED_HOSTFILE)")
        if config.rank < 1:
            raise InvalidArgument("a worker needs --rank N with N >= 1 (rank 0 is the "
                                  "gRPC server, started with --addr)")
        config.check()
        return config

    @classmethod
    def for_rank0(cls, hostfile: Optional[str], backend: Optional[str]) -> Optional["GroupConfig"]:
        """Rank 0's settings from LoadModel options or the environment; None
        means one process, as without any of this."""
        hostfile = hostfile or os.environ.get("MLX_DISTRIBUTED_HOSTFILE", "")
        if not hostfile:
            return None
        config = cls(hostfile=hostfile,
                     backend=backend or os.environ.get("MLX_DISTRIBUTED_BACKEND", "ring"),
                     rank=0, coordinator=os.environ.get("MLX_JACCL_COORDINATOR", ""))
        config.check()
        return config

    def check(self):
        if self.backend not in BACKENDS:
            raise InvalidArgument(f"distributed backend {self.backend!r} is not one of "
                                  f"{', '.join(BACKENDS)}")
        hosts = self.hosts()
        if len(hosts) < 2:
            raise InvalidArgument(f"hostfile {self.hostfile} lists {len(hosts)} rank(s); "
                                  "distributed serving needs at least 2")
        if self.rank >= len(hosts):
            raise InvalidArgument(f"rank {self.rank} is not in hostfile {self.hostfile} "
                                  f"({len(hosts)} ranks)")

    def hosts(self) -> list:
        """The hostfile's entries, one per rank (ring: "ip:port" or a list of them)."""
        try:
            with open(self.hostfile) as f:
                hosts = json.load(f)
        except OSError as err:
            raise InvalidArgument(f"cannot read hostfile {self.hostfile}: "
                                  f"{err.strerror or err}") from None
        except ValueError as err:
            raise InvalidArgument(f"hostfile {self.hostfile} is not JSON: {err}") from None
        if not isinstance(hosts, list):
            raise InvalidArgument(f"hostfile {self.hostfile} must be a JSON array, one entry "
                                  "per rank")
        return hosts

    def ring_address(self, rank: int) -> str:
        """The first "ip:port" rank `rank` listens on, from a ring hostfile."""
        entry = self.hosts()[rank]
        address = entry[0] if isinstance(entry, list) and entry else entry
        if not isinstance(address, str) or ":" not in address:
            raise InvalidArgument(f"hostfile {self.hostfile}: entry {rank} must be "
                                  f'"ip:port" (or a list of them), got {entry!r}')
        return address

    def describe(self, rank: int) -> str:
        if self.backend == "ring":
            try:
                return f"rank {rank} ({self.ring_address(rank)})"
            except (InvalidArgument, IndexError):  # named by number alone, then
                pass
        return f"rank {rank}"

    def environment(self) -> dict:
        """The variables MLX's backends read at init."""
        env = {"MLX_RANK": str(self.rank)}
        if self.backend == "ring":
            env["MLX_HOSTFILE"] = os.path.abspath(self.hostfile)
        else:
            env["MLX_IBV_DEVICES"] = os.path.abspath(self.hostfile)
            if self.coordinator:
                env["MLX_JACCL_COORDINATOR"] = self.coordinator
        return env


def _split(address: str):
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _same_host(peer_ip: str, expected_host: str) -> bool:
    try:
        expected = {info[4][0] for info in socket.getaddrinfo(expected_host, None)}
    except OSError:
        return False
    if peer_ip in expected:
        return True
    peer = ipaddress.ip_address(peer_ip)
    return peer.is_loopback and any(ipaddress.ip_address(e).is_loopback for e in expected)


def wait_for_rank0(config: GroupConfig, stopping=lambda: False):
    """Worker side: answer rank 0's knock on our ring address and return the
    open link to rank 0; None if `stopping()` came first. Knocks from any
    host but rank 0's (as the hostfile names it) are refused."""
    host, port = _split(config.ring_address(config.rank))
    rank0_host, _ = _split(config.ring_address(0))
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(4)
    listener.settimeout(0.5)
    log.info("worker %s waiting for rank 0 (%s)", config.describe(config.rank), rank0_host)
    try:
        while not stopping():
            try:
                peer, (peer_ip, *_) = listener.accept()
            except socket.timeout:
                continue
            if not _same_host(peer_ip, rank0_host):
                log.warning("refused a knock from %s: not rank 0's host", peer_ip)
                peer.close()
                continue
            peer.settimeout(5)
            try:
                if peer.recv(len(KNOCK)) == KNOCK:
                    peer.sendall(READY)
                    peer.settimeout(3600)  # rank 0 is knocking on the other workers
                    if peer.recv(len(GO)) == GO:
                        peer.settimeout(None)
                        return peer
                    log.info("rank 0 gave up on the group (another worker did not answer)")
            except OSError:
                pass
            peer.close()
        return None
    finally:
        listener.close()


def knock_on_workers(config: GroupConfig, timeout: float) -> dict:
    """Rank 0 side: every worker must answer within `timeout` seconds.
    Returns the open links, by rank."""
    deadline = time.monotonic() + timeout
    links = {}
    for rank in range(1, len(config.hosts())):
        host, port = _split(config.ring_address(rank))
        while True:
            conn = None
            try:
                conn = socket.create_connection((host, port), timeout=2)
                conn.sendall(KNOCK)
                if conn.recv(len(READY)) == READY:
                    conn.settimeout(None)
                    links[rank] = conn
                    break
            except OSError:
                pass
            if conn is not None:
                conn.close()
            if time.monotonic() > deadline:
                for link in links.values():
                    link.close()
                raise Unavailable(
                    f"worker {config.describe(rank)} did not answer within {timeout:g}s: "
                    f"start it with `run.sh --worker --backend {config.backend} --hostfile "
                    f"{config.hostfile} --rank {rank}` (or `local-ai worker mlx-distributed "
                    f"--hostfile {config.hostfile} --rank {rank}`)")
            time.sleep(0.2)
    for link in links.values():
        link.sendall(GO)
    return links


def join(config: GroupConfig, timeout: float = 30.0, stopping=lambda: False):
    """Join the group as `config.rank`: (the `mx.distributed.Group`, the
    liveness links by rank); (None, {}) when a waiting worker was told to stop."""
    import mlx.core as mx

    links = {}
    if config.backend == "ring":
        if config.rank == 0:
            links = knock_on_workers(config, timeout)
        else:
            link = wait_for_rank0(config, stopping)
            if link is None:
                return None, {}
            links = {0: link}
    os.environ.update(config.environment())
    started = time.monotonic()
    try:
        group = mx.distributed.init(strict=True, backend=config.backend)
    except Exception as err:  # MLX raises RuntimeError/ValueError for a bad setup
        raise Unavailable(f"cannot join the {config.backend} group as rank {config.rank}: "
                          f"{err}") from err
    if group.size() != len(config.hosts()):
        raise Unavailable(f"joined a group of {group.size()} ranks, but the hostfile lists "
                          f"{len(config.hosts())}")
    log.info("joined the %s group as rank %d of %d in %.1fs", config.backend, group.rank(),
             group.size(), time.monotonic() - started)
    return group, links


def watch_links(links: dict, on_lost, on_wake=lambda: None):
    """From daemon threads: `on_wake()` for each wake-up byte rank 0 sends
    (see `wake`), `on_lost(rank)` when a rank's link closes: its process is gone."""
    import threading

    def watch(rank, link):
        while True:
            try:
                byte = link.recv(1)
            except OSError:
                byte = b""
            if not byte:
                on_lost(rank)
                return
            on_wake()

    for rank, link in links.items():
        threading.Thread(target=watch, args=(rank, link), name=f"mlx-link-{rank}",
                         daemon=True).start()


def describe_loss(config: GroupConfig, size: int) -> str:
    """Which ranks a lost connection may mean, for rank 0's error message."""
    workers: List[str] = [config.describe(r) for r in range(1, size)]
    if len(workers) == 1:
        return f"worker {workers[0]} stopped answering"
    return f"a worker stopped answering (one of: {', '.join(workers)})"
