"""Real ``celery worker`` processes, started with every flag written out.

A ``Worker`` is the command line a learner would type, run as an OS process in its own process group
(registered with the kernel's watchdog). It is ready when Celery's ``worker_ready`` signal fires
(recorded by ``celerylab.recording``), never after a fixed sleep. If it exits or hangs while
booting, the error carries the tail of its log.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from celerylab.errors import CourseError
from celerylab.processes import ProcessGroup, children_of, pid_alive
from celerylab.recording import READY

BOOT_TIMEOUT = 20.0


class WorkerError(CourseError):
    """A worker did not boot, or misbehaved; the message carries its log tail."""


class Worker:
    """One ``celery -A <app> worker`` process (main process plus its pool children)."""

    def __init__(self, stack, app: str, *, name: str = "w1", queues=("celery",),
                 concurrency: int = 1, pool: str = "prefork", prefetch_multiplier: int = 4,
                 loglevel: str = "INFO", events: bool = False, extra_args=(), env=None,
                 cwd: str | Path | None = None) -> None:
        self.stack = stack
        self.app = app
        self.name = name
        self.hostname = f"{name}@{stack.namespace}"
        self.queues = [queues] if isinstance(queues, str) else list(queues)
        self.concurrency = concurrency
        self.pool = pool
        self.prefetch_multiplier = prefetch_multiplier
        self.loglevel = loglevel
        self.events = events
        self.extra_args = list(extra_args)
        self.cwd = str(cwd or os.getcwd())
        self.extra_env = dict(env or {})
        self.logfile = Path(stack.rundir) / f"worker-{name}.log"
        self.group: ProcessGroup | None = None
        self.boot_seconds: float | None = None

    @property
    def typed_command(self) -> list[str]:
        """The command a learner would type in a terminal for this worker, flags explicit."""
        cmd = ["celery", "-A", self.app, "worker",
               "--queues", ",".join(self.queues),
               "--pool", self.pool,
               "--concurrency", str(self.concurrency),
               "--prefetch-multiplier", str(self.prefetch_multiplier),
               "--loglevel", self.loglevel]
        if self.events:
            cmd.append("--task-events")
        return cmd + self.extra_args

    @property
    def course_flags(self) -> list[str]:
        """What the course adds to it: a name, a log file, its recorder, a faster boot."""
        return ["--hostname", self.hostname,
                "--logfile", str(self.logfile),
                "--include", "celerylab.recording",
                # mingle and gossip talk to other workers at boot (mingle waits ~1 s); the course's
                # workers do not need them, and heartbeats only matter to event monitors.
                "--without-mingle", "--without-gossip", "--without-heartbeat"]

    @property
    def command(self) -> list[str]:
        """The exact command line that runs: what a learner would type, plus the course's flags."""
        return self.typed_command + self.course_flags

    def __repr__(self) -> str:
        state = "running" if self.alive else "stopped"
        return f"<Worker {self.hostname} pid={self.pid} {state}: {' '.join(self.command[:12])} ...>"

    # lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = BOOT_TIMEOUT) -> Worker:
        if self.alive:
            return self
        env = {**os.environ, **self.stack.env, **self.extra_env,
               "CELERYLAB_WORKER_HOSTNAME": self.hostname,
               "PYTHONPATH": os.pathsep.join(filter(None, [self.cwd,
                                                           os.environ.get("PYTHONPATH")]))}
        self.logfile.unlink(missing_ok=True)
        ready_key = READY + self.hostname
        self.stack.redis.delete(ready_key)
        t0 = time.monotonic()
        # `celery` itself, through a launcher that skips its CLI plugins (celerylab.celery_worker)
        argv = [sys.executable, "-m", "celerylab.celery_worker", *self.command[1:]]
        self.group = ProcessGroup.spawn(argv, log=self.logfile.with_suffix(".out"), env=env,
                                        cwd=self.cwd, watchdog=self.stack.watchdog)
        if self not in self.stack._workers:
            self.stack._workers.append(self)
        deadline = t0 + timeout
        while True:
            if self.stack.redis.blpop([ready_key], timeout=0.1):
                self.boot_seconds = time.monotonic() - t0
                return self
            code = self.group.poll()
            if code is not None:
                raise WorkerError(
                    f"Worker {self.hostname} exited with code {code} while booting.\n"
                    f"Command: {' '.join(self.command)}\n--- its log ends with ---\n"
                    f"{self.log_tail()}\n--- fix the error above (often the task module "
                    f"'{self.app}' does not import), then start the worker again.")
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.group.kill()
                raise WorkerError(
                    f"Worker {self.hostname} did not report ready within {timeout:.0f} s, so it "
                    f"was stopped.\n--- its log ends with ---\n{tail}\n--- is the broker reachable, "
                    "and does the task module finish importing?")

    def stop(self, timeout: float = 10.0) -> None:
        """Warm shutdown (SIGTERM: running tasks finish), SIGKILL after ``timeout``."""
        if self.group:
            self.group.stop(timeout=timeout)

    def cold_stop(self, timeout: float = 10.0) -> None:
        """Cold shutdown (SIGQUIT: running tasks are abandoned)."""
        if self.group:
            self.group.stop(timeout=timeout, sig=signal.SIGQUIT)

    def kill(self) -> None:
        """SIGKILL the main process and its children at once: a crash, not a shutdown."""
        if self.group:
            self.group.kill()

    def kill_child(self, pid: int | None = None) -> int:
        """SIGKILL one pool child (the first, unless ``pid`` is given); returns its pid."""
        kids = self.children()
        if not kids:
            raise WorkerError(f"{self.hostname} has no pool children to kill (pool={self.pool}).")
        victim = pid or kids[0]
        if victim not in kids:
            raise WorkerError(f"{victim} is not a pool child of {self.hostname} (children: {kids}).")
        os.kill(victim, signal.SIGKILL)
        return victim

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # what a learner looks at ------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.group.pid if self.group else None

    @property
    def alive(self) -> bool:
        return bool(self.group and self.group.alive)

    def children(self) -> list[int]:
        """Pids of the pool's child processes (empty for solo and threads pools)."""
        return [p for p in children_of(self.pid) if pid_alive(p)] if self.alive else []

    def log_tail(self, lines: int = 25) -> str:
        chunks = []
        for path in (self.logfile.with_suffix(".out"), self.logfile):
            try:
                chunks += path.read_text(errors="replace").strip().splitlines()
            except OSError:
                pass
        return "\n".join(chunks[-lines:]) or "(the worker wrote no log)"

    def describe(self) -> dict:
        return {"hostname": self.hostname, "main pid": self.pid, "pool": self.pool,
                "children": self.children(), "queues": self.queues,
                "concurrency": self.concurrency, "prefetch multiplier": self.prefetch_multiplier,
                "boot s": None if self.boot_seconds is None else round(self.boot_seconds, 2)}

