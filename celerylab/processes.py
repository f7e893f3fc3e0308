"""OS processes the course starts: each in its own process group, registered with a watchdog.

Every process group is registered with the kernel's watchdog (see ``celerylab.watchdog``), so it is
stopped even if the kernel is killed. ``stop`` is TERM to the group leader, then KILL to the whole
group after a bound.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def home() -> Path:
    """Where runtime files go: $CELERYLAB_HOME, the repository checkout, or ~/.cache/celerylab."""
    if os.environ.get("CELERYLAB_HOME"):
        return Path(os.environ["CELERYLAB_HOME"])
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").exists():
        return repo / ".celerylab"
    return Path.home() / ".cache" / "celerylab"


def pidfile(pid: int) -> Path:
    """A note per running process the course started, for ``./course reset``."""
    return home() / "pids" / str(pid)


class Watchdog:
    """The client side: a pipe to ``python -m celerylab.watchdog``, one per kernel process."""

    _instance: Watchdog | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celerylab.watchdog"], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            text=True)
        self.owner = os.getpid()

    @classmethod
    def get(cls) -> Watchdog:
        with cls._lock:
            inst = cls._instance
            if inst is None or inst.owner != os.getpid() or inst.proc.poll() is not None:
                cls._instance = inst = cls()
            return inst

    def _send(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def register(self, pgid: int) -> None:
        self._send(f"+{pgid}")

    def unregister(self, pgid: int) -> None:
        self._send(f"-{pgid}")


class ProcessGroup:
    """A child process started in a new session (so it leads its own process group)."""

    def __init__(self, popen: subprocess.Popen, log: Path, watchdog: Watchdog | None) -> None:
        self.popen = popen
        self.log = log
        self.watchdog = watchdog
        if watchdog:
            watchdog.register(popen.pid)
        _LIVE.add(self)
        try:
            pidfile(popen.pid).parent.mkdir(parents=True, exist_ok=True)
            # owner (the kernel), command; then which notebook and since when (./course doctor)
            pidfile(popen.pid).write_text(
                f"{os.getpid()} {popen.args[0]}\n"
                f"{os.environ.get('CELERYLAB_NAMESPACE') or '-'} {time.time():.0f}\n")
        except OSError:
            pass

    @classmethod
    def spawn(cls, cmd: list[str], *, log: Path, env: dict | None = None, cwd: str | None = None,
              watchdog: Watchdog | None = None) -> ProcessGroup:
        log.parent.mkdir(parents=True, exist_ok=True)
        if cmd[1:3] == ["-m", "celerylab.celery_worker"] and Launcher.wanted(cmd):
            launched = Launcher.get().spawn(cmd, log=log, env=env, cwd=cwd)
            if launched is not None:
                return cls(launched, log, watchdog or Watchdog.get())
        with open(log, "ab") as out:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     start_new_session=True)
        return cls(popen, log, watchdog or Watchdog.get())

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, sig: int, group: bool = False) -> None:
        try:
            if group:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> bool:
        try:
            self.popen.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to the leader, wait up to ``timeout``, then SIGKILL the whole group."""
        if self.alive:
            self.send(sig)
            self.wait(timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the whole group (leader and children) and reap the leader."""
        self.send(signal.SIGKILL, group=True)
        self.wait(5)
        if self.watchdog:
            self.watchdog.unregister(self.pid)
        _LIVE.discard(self)
        pidfile(self.pid).unlink(missing_ok=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.strip().splitlines()[-lines:])


def _comparable(env) -> dict:
    """What of an environment a launcher's imports may have read: all but the course's own
    variables (read when a worker runs), PYTHONPATH (applied to each worker's sys.path) and
    pytest's name of the running test (a new one each test: a launcher each, before)."""
    return {k: v for k, v in env.items()
            if not k.startswith("CELERYLAB_") and k not in ("PYTHONPATH", "PYTEST_CURRENT_TEST")}


class Launcher:
    """The client side of ``python -m celerylab.celery_worker --serve``: a process per kernel that
    imported celery once and forks each worker from there (see ``celerylab.celery_worker``).

    A worker whose environment differs from the launcher's (beyond the course's variables and
    PYTHONPATH) starts as a fresh ``python`` instead: modules read some variables at import."""

    _instance: Launcher | None = None
    _lock = threading.Lock()
    READY_TIMEOUT = 10.0

    def __init__(self, hide: tuple[str, ...] | None = None) -> None:
        self.owner = os.getpid()
        self.lock = threading.Lock()
        self.ready = False
        self.env = _comparable(os.environ)
        log = home() / "launcher.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        if hide is None:
            env = {k: v for k, v in os.environ.items() if not k.startswith("CELERYLAB_")
                   or k in ("CELERYLAB_HOME",)}
            with open(log, "ab") as err:
                popen = subprocess.Popen(
                    [sys.executable, "-m", "celerylab.celery_worker", "--serve"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                    start_new_session=True, text=True, env=env)
        else:
            popen = _ForkedLauncher(log, hide)
        self.group = ProcessGroup(popen, log, Watchdog.get())

    @classmethod
    def fork_here(cls, hide: tuple[str, ...] = ()) -> Launcher:
        """This process's launcher, forked from it rather than started afresh: for a process
        that already imported celery's worker (``celery_worker.import_worker``), imported no
        task module and runs no thread yet (the suite's side-by-side answers). ``hide``: its
        own ``sys.path`` entries."""
        if threading.active_count() > 1:
            raise RuntimeError("Launcher.fork_here: this process runs threads; use Launcher.get")
        with cls._lock:
            if cls._instance is not None and cls._instance.owner == os.getpid():
                cls._instance.group.stop(timeout=2)
            cls._instance = inst = cls(hide=tuple(hide))
            return inst

    @staticmethod
    def wanted(cmd: list[str]) -> bool:
        from celerylab.celery_worker import FORKABLE_POOLS
        if os.environ.get("CELERYLAB_WORKER_LAUNCH", "fork") == "exec" or not hasattr(os, "fork"):
            return False
        pool = cmd[cmd.index("--pool") + 1] if "--pool" in cmd[:-1] else "prefork"
        return pool in FORKABLE_POOLS

    @classmethod
    def get(cls) -> Launcher:
        """This process's launcher, started if need be (it imports for ~1 s, in the background);
        a new one when this process's environment changed since."""
        with cls._lock:
            inst = cls._instance
            if inst is not None and inst.owner == os.getpid() and inst.group.alive \
                    and inst.env != _comparable(os.environ):
                inst.group.stop(timeout=2)
            if inst is None or inst.owner != os.getpid() or not inst.group.alive:
                cls._instance = inst = cls()
            return inst

    def _answer(self, timeout: float) -> str:
        out = self.group.popen.stdout
        if not select.select([out], [], [], timeout)[0]:
            raise TimeoutError("the launcher did not answer")
        line = out.readline()
        if not line:
            raise OSError("the launcher has gone")
        return line.strip()

    def spawn(self, cmd: list[str], *, log: Path, env: dict | None, cwd: str | None):
        """Fork a worker running ``cmd``; None when the launcher cannot (the caller execs)."""
        import uuid
        env = dict(env if env is not None else os.environ)
        if _comparable(env) != self.env:
            return None  # e.g. Worker(env={...}): a fresh python reads it at import
        rid = uuid.uuid4().hex[:12]
        request = json.dumps({"id": rid, "argv": cmd[3:], "env": env, "log": str(log),
                              "cwd": str(cwd or os.getcwd()), "exits": str(log.parent)})
        with self.lock:
            try:
                if not self.ready:
                    if self._answer(self.READY_TIMEOUT) != "ready":
                        raise OSError("the launcher did not start")
                    self.ready = True
                self.group.popen.stdin.write(request + "\n")
                self.group.popen.stdin.flush()
                deadline = time.monotonic() + 5.0
                while True:  # skip answers to requests abandoned earlier
                    answer_id, _, pid = self._answer(deadline - time.monotonic()).partition(" ")
                    if answer_id == rid:
                        break
                pid = int(pid)
            except BaseException as exc:
                # broken or interrupted: it stops, and asks what it forked to stop too; the next
                # worker gets a new launcher, this one a fresh python (or the interrupt goes on)
                self.group.stop(timeout=2)
                if isinstance(exc, (OSError, ValueError)):  # TimeoutError is an OSError
                    return None
                raise
        return Launched(pid, cmd, log.parent / f"{pid}.exit", self)


class _Polled:
    """``Popen.wait`` for a process known by ``poll`` alone."""

    args: list[str]
    returncode: int | None

    def poll(self) -> int | None:
        raise NotImplementedError

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode


class _ForkedLauncher(_Polled):
    """What ``ProcessGroup`` and ``Launcher`` need of a ``Popen``, for a launcher forked from
    this process (``Launcher.fork_here``)."""

    def __init__(self, log: Path, hide: tuple[str, ...]) -> None:
        requests, to_launcher = os.pipe()
        from_launcher, answers = os.pipe()
        self.args = [sys.executable, "-m", "celerylab.celery_worker", "--serve"]
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:  # the launcher: it never returns from here
            code = 1
            try:
                import gc
                import multiprocessing.process as mp
                os.setsid()
                os.dup2(requests, 0)
                os.dup2(answers, 1)
                err = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(err, 2)
                # nothing of the parent's: its pipes and sockets (the objects that held them are
                # frozen, so that no collection closes a number reused since), its identity
                gc.freeze()
                os.closerange(3, os.sysconf("SC_OPEN_MAX"))
                mp._current_process, mp._parent_process = mp._MainProcess(), None
                mp._children = set()
                sys.stdin = open(0, closefd=False)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                from celerylab.celery_worker import serve
                serve(hide)
                code = 0
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(requests)
        os.close(answers)
        self.stdin = open(to_launcher, "w")
        self.stdout = open(from_launcher)

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -signal.SIGKILL
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


class Launched(_Polled):
    """A worker forked by the launcher: what ``ProcessGroup`` needs of a ``Popen``. Its exit
    status comes from the file the launcher writes when it reaps it."""

    def __init__(self, pid: int, args: list[str], exit_file: Path, launcher: Launcher) -> None:
        self.pid, self.args, self.exit_file, self.launcher = pid, args, exit_file, launcher
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._status()
            if self.returncode is None and not Path(f"/proc/{self.pid}").exists() \
                    and not pid_alive(self.pid):  # gone, reaped, yet no status (after a moment
                time.sleep(0.2)                   # for the launcher to write it): unknown
                self.returncode = self._status()
                if self.returncode is None:
                    self.returncode = -signal.SIGKILL
        return self.returncode

    def _status(self) -> int | None:
        try:
            return int(self.exit_file.read_text())
        except (OSError, ValueError):
            return None


def children_of(pid: int) -> list[int]:
    """Pids of the direct children of ``pid`` (pgrep exists on Linux and macOS)."""
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return sorted(int(p) for p in out.split())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0): look at its state where we can
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False
    return True


_LIVE: set[ProcessGroup] = set()


def stop_groups(groups, timeout: float = 5.0) -> None:
    """SIGTERM every leader at once, wait for all within one shared bound, then SIGKILL the rest."""
    groups = [g for g in groups if g is not None]
    for g in groups:
        g.send(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for g in groups:
        g.wait(max(0.0, deadline - time.monotonic()))
        g.kill()


def stop_all(timeout: float = 5.0) -> None:
    """Stop every process group this kernel still owns, in parallel (atexit, and on demand)."""
    stop_groups(list(_LIVE), timeout)


atexit.register(stop_all)
