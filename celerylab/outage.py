"""Broker outages on purpose (chapter 9, lab 9): drop every connection, freeze the broker, fail it
over to a replica.

Each fault is what production does to a broker, done to one of the course's own redis-servers:
``drop_connections`` is what a network blip or a proxy restart does to clients, ``frozen`` what a
stalled host (a long fork for a snapshot, a paused VM) does, and ``Sentinels`` runs Redis Sentinel
locally (a primary, a replica and three sentinels, all ``redis-server`` processes the notebook owns,
stopped with its stack and by the watchdog when the kernel dies) so the primary can be killed.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import redis

from celerylab.broker import BrokerError, RedisServer, find_redis_server, free_port
from celerylab.processes import ProcessGroup
from celerylab.stack import remember_broker

MASTER = "celerylab"


def spare_broker(stack, name: str = "spare", appendonly: bool = False) -> RedisServer:
    """Another redis-server of the course's own, stopped with ``stack``: a broker to break while
    the notebook's own Redis (where tasks record what they did) stays up. ``appendonly``: what
    it holds survives a restart (an append-only file, fsync'ed on every write)."""
    server = RedisServer(stack.rundir / name, appendonly=appendonly).start(watchdog=stack.watchdog)
    stack.services.append(server)
    remember_broker(server.url)
    return server


def sentinels(stack) -> Sentinels:
    """A local Redis Sentinel set (see ``Sentinels``), stopped with ``stack``."""
    found = Sentinels(stack.rundir / "sentinel").start(watchdog=stack.watchdog)
    stack.services.append(found)
    remember_broker(found.url)
    return found


def drop_connections(r: redis.Redis) -> int:
    """Close every normal client connection of ``r``'s server but ``r``'s own (``CLIENT KILL TYPE
    normal``): what a network blip does. Returns how many were closed."""
    return int(r.client_kill_filter(_type="normal", skipme=True))


def consumers_waiting(r: redis.Redis) -> int:
    """How many clients are inside a blocking pop right now (a worker's consumer waiting for a
    message): a dropped connection reaches a consumer there at once."""
    # "cmd" is a client's last command; flag "b" says it is blocked in it now
    return sum(1 for c in r.client_list()
               if "b" in c.get("flags", "") and c.get("cmd") in ("brpop", "blpop", "blmove"))


@contextmanager
def frozen(server: RedisServer):
    """The broker process stopped (SIGSTOP) inside the block, resumed (SIGCONT) after it: its port
    still accepts connections, nothing answers. What a stalled host looks like to its clients."""
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield server
    finally:
        os.kill(server.pid, signal.SIGCONT)


def thaw(server: RedisServer) -> None:
    """Resume a frozen broker (a check interrupted inside ``frozen`` may leave one stopped)."""
    if server.group is not None and server.group.alive:
        os.kill(server.pid, signal.SIGCONT)


class Sentinels:
    """Redis Sentinel, run locally: a primary, one replica (asynchronous replication) and three
    sentinels that agree (quorum 2) when the primary is down and promote the replica.

    ``url`` and ``transport_options`` are what kombu's ``sentinel://`` transport needs."""

    def __init__(self, rundir: Path, down_after_ms: int = 1000, failover_timeout_ms: int = 5000):
        self.rundir = Path(rundir)
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.primary: RedisServer | None = None
        self.replica: RedisServer | None = None
        self.sentinels: list[tuple[int, ProcessGroup]] = []

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}" for port, _ in self.sentinels)

    @property
    def transport_options(self) -> dict:
        return {"master_name": MASTER}

    def servers(self) -> list[RedisServer]:
        return [s for s in (self.primary, self.replica) if s is not None]

    def start(self, watchdog=None) -> Sentinels:
        try:
            # no 5 s wait before a replica's first sync (redis-server's default)
            self.primary = RedisServer(self.rundir, extra=["--repl-diskless-sync-delay", "0"]
                                       ).start(watchdog=watchdog)
            self.replica = RedisServer(self.rundir, extra=[
                "--replicaof", "127.0.0.1", str(self.primary.port)]).start(watchdog=watchdog)
            binary, _ = find_redis_server()
            # each sentinel is told the others and the replica up front: found by themselves, they
            # take a few seconds of hello messages to know each other
            ids = {free_port(): os.urandom(20).hex() for _ in range(3)}
            for port, myid in ids.items():
                conf = self.rundir / f"sentinel-{port}.conf"
                conf.write_text(
                    f"port {port}\nbind 127.0.0.1\ndir {self.rundir}\nsentinel myid {myid}\n"
                    f"sentinel monitor {MASTER} 127.0.0.1 {self.primary.port} 2\n"
                    f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {MASTER} {self.failover_timeout_ms}\n"
                    f"sentinel parallel-syncs {MASTER} 1\n"
                    f"sentinel known-replica {MASTER} 127.0.0.1 {self.replica.port}\n"
                    + "".join(f"sentinel known-sentinel {MASTER} 127.0.0.1 {p} {i}\n"
                              for p, i in ids.items() if p != port))
                group = ProcessGroup.spawn([binary, str(conf), "--sentinel"],
                                           log=self.rundir / f"sentinel-{port}.log",
                                           watchdog=watchdog)
                self.sentinels.append((port, group))
            self._wait(lambda: self._replica_linked() and self._sentinels_see_all(),
                       5.0, "the replica to sync and the sentinels to find each other")
        except BaseException:
            self.stop()
            raise
        return self

    def _replica_linked(self) -> bool:
        info = redis.Redis(port=self.replica.port, socket_timeout=1).info("replication")
        return info.get("master_link_status") == "up"

    def _sentinels_see_all(self) -> bool:
        for port, _ in self.sentinels:
            s = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
            master = s.sentinel_master(MASTER)
            if master.get("num-other-sentinels", 0) < 2 or master.get("num-slaves", 0) < 1:
                return False
        return True

    def _wait(self, predicate, timeout: float, what: str) -> float:
        t0 = time.monotonic()
        while True:
            try:
                if predicate():
                    return time.monotonic() - t0
            except redis.RedisError:
                pass
            if time.monotonic() - t0 > timeout:
                raise BrokerError(f"Redis Sentinel: waited {timeout:g} s for {what}. The logs are "
                                  f"in {self.rundir}.")
            time.sleep(0.02)

    def primary_port(self) -> int | None:
        """The primary's port, as the first sentinel that answers sees it."""
        for port, group in self.sentinels:
            if not group.alive:
                continue
            try:
                s = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
                return int(s.sentinel_get_master_addr_by_name(MASTER)[1])
            except (redis.RedisError, TypeError):
                continue
        return None

    def cut_off_replica(self) -> None:
        """A network partition between primary and replica: the replica frozen, its link closed
        by the primary. What the primary accepts now, the replica never receives."""
        os.kill(self.replica.pid, signal.SIGSTOP)
        redis.Redis(port=self.primary_port(), socket_timeout=1).client_kill_filter(_type="replica")

    def heal_replica(self) -> None:
        os.kill(self.replica.pid, signal.SIGCONT)

    def kill_primary(self) -> RedisServer:
        """SIGKILL the primary (nothing saved, no goodbye): the sentinels must notice and promote."""
        port = self.primary_port()
        dead = next(s for s in self.servers() if s.port == port)
        dead.group.kill()
        return dead

    def wait_for_failover(self, old_port: int, timeout: float = 15.0) -> float:
        """Seconds until the sentinels name a new primary that answers as one."""
        from redis.sentinel import MasterNotFoundError, Sentinel
        # what kombu's sentinel:// transport asks: a master every sentinel it reaches agrees on
        found = Sentinel([("127.0.0.1", port) for port, _ in self.sentinels], socket_timeout=1)

        def promoted() -> bool:
            try:
                _host, port = found.discover_master(MASTER)
            except MasterNotFoundError:
                return False
            if port == old_port or any(self._named(s) != port for s in self._live_sentinels()):
                return False
            return redis.Redis(port=port, socket_timeout=1).info("replication")["role"] == "master"
        return self._wait(promoted, timeout, "a replica to be promoted")

    def _live_sentinels(self) -> list[int]:
        return [port for port, group in self.sentinels if group.alive]

    def _named(self, sentinel_port: int) -> int | None:
        s = redis.Redis(port=sentinel_port, socket_timeout=1, decode_responses=True)
        master = s.sentinel_master(MASTER)
        return int(master["port"]) if master.get("is_master") and not (
            master.get("is_sdown") or master.get("is_odown")) else None

    def stop(self, timeout: float = 3.0) -> None:
        for _, group in self.sentinels:
            group.stop(timeout=timeout)
        for server in self.servers():
            server.stop()
