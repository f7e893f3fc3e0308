"""The figures of docs/benchmarks.md, measured on this machine. Printed, never asserted.

    ./course bench                 broker and worker readiness, stop time, memory
    ./course bench --notebooks     also each notebook's wall time (run one after another)
    ./course bench --notebooks --hog 1
                                   the same with a busy loop beside (a laptop doing other work)
    ./course bench --only ch10,lab10
                                   only the notebooks whose names contain one of these
    ./course bench --suite         also the whole test suite's wall time
    ./course bench --soak N [--hog K]
                                   the whole suite N times in a row, with K busy-loop processes
                                   beside it: pass/fail per run and the failing tests
    ./course bench --record-burst  record an ordinary burst's (depth, oldest age) readings into
                                   celerylab/monitoring/burst-trace.json (labs 7 and 8 replay it,
                                   the alert rules' unit test feeds it to promtool)
"""

from __future__ import annotations

import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TASKS = """
import os
from celery import Celery
app = Celery("bench_tasks", broker=os.environ["CELERYLAB_BROKER_URL"],
             backend=os.environ["CELERYLAB_BROKER_URL"])
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])

@app.task
def add(x, y):
    return x + y
"""


def rss_kib(pids) -> int:
    out = subprocess.run(["ps", "-o", "rss=", "-p", ",".join(map(str, pids))],
                         capture_output=True, text=True).stdout
    return sum(int(v) for v in out.split())


def stack_figures(rounds: int = 3) -> dict:
    import celerylab
    from celerylab.broker import RedisServer

    broker, worker_ready, total, stop = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(5):
            t0 = time.monotonic()
            server = RedisServer(Path(tmp) / "b").start()
            broker.append(time.monotonic() - t0)
            server.stop()
        (Path(tmp) / "bench_tasks.py").write_text(TASKS)
        sys.path.insert(0, tmp)
        memory = 0
        for i in range(rounds):
            t0 = time.monotonic()
            stack = celerylab.start(f"bench{i}")
            t1 = time.monotonic()
            w = stack.worker("bench_tasks", concurrency=1, cwd=tmp).start()
            sys.modules.pop("bench_tasks", None)  # it reads this stack's broker URL on import
            tasks = importlib.import_module("bench_tasks")
            tasks.add.delay(1, 1).get(timeout=30)
            t2 = time.monotonic()
            worker_ready.append(t2 - t1)
            total.append(t2 - t0)
            if i == 0:
                for r in [tasks.add.delay(n, n) for n in range(200)]:
                    r.get(timeout=30)
                memory = rss_kib([stack.server.pid, w.pid, *w.children()])
            t3 = time.monotonic()
            stack.stop()
            stop.append(time.monotonic() - t3)
    med = statistics.median
    return {"broker ready (redis-server to PING), median s": med(broker),
            "worker ready (spawn to first result, -c 1), median s": med(worker_ready),
            "broker + worker ready, median s": med(total),
            "stop (worker warm shutdown + broker), median s": med(stop),
            "memory: Redis + worker (-c 1) after 200 tasks, MiB": memory / 1024}


def notebook_times(only: str = "") -> dict:
    import nbformat
    from nbclient import NotebookClient
    times = {}
    wanted = [w for w in only.split(",") if w]
    for d in ("notebooks", "solutions"):
        for nb_path in sorted((ROOT / d).glob("*.ipynb")):
            if wanted and not any(w in nb_path.name for w in wanted):
                continue
            nb = nbformat.read(nb_path, as_version=4)
            t0 = time.monotonic()
            NotebookClient(nb, timeout=300, kernel_name="python3",
                           resources={"metadata": {"path": str(nb_path.parent)}}).execute()
            times[f"{d}/{nb_path.name}, s"] = time.monotonic() - t0
    return times


BURST_TRACE = ROOT / "celerylab" / "monitoring" / "burst-trace.json"


def record_burst(messages: int = 150, tick: float = 0.25, out: Path = BURST_TRACE) -> dict:
    """An ordinary burst, live: a four-child worker (prefetch 1) on a queue of its own, paused
    while ``messages`` 50 ms tasks are published (so they arrive at once, as in chapter 7), then
    left to drain; depth and oldest age are read every ``tick`` until the queue is empty and
    nothing is held. With 80 tasks a second of capacity, 150 leave the oldest waiting about 1.75
    s (1.5 to 2 s on a busy machine): what lab 7's text calls an ordinary burst."""
    import json
    import platform
    import signal

    import celerylab
    from celerylab import observe
    stack = celerylab.start("burst-trace")
    try:
        worker = stack.worker("celerylab.workloads", name="burst", queues=["burst"],
                              concurrency=4, prefetch_multiplier=1).start()
        readings = []

        def read():
            readings.append((observe.depth(stack.redis, "burst"),
                             observe.oldest_age(stack.redis, "burst")))

        next_at = time.monotonic()

        def tick_wait():
            nonlocal next_at
            next_at += tick
            time.sleep(max(0.0, next_at - time.monotonic()))

        read()
        tick_wait()
        os.killpg(worker.pid, signal.SIGSTOP)
        try:
            for _ in range(messages):
                stack.control.send_task("celerylab.workloads.wait_io", (0.05,), queue="burst")
        finally:
            os.killpg(worker.pid, signal.SIGCONT)
        while True:  # one reading every tick (the publishing above took the first tick or two)
            read()
            if readings[-1][0] == 0 and not observe.in_flight(stack.redis).get("burst"):
                break
            tick_wait()
        read()
    finally:
        stack.stop()
    trace = {"recorded": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
                        f"load {os.getloadavg()[0]:.2f}, Python {platform.python_version()}",
             "how": f"./course bench --record-burst: {messages} tasks of 50 ms published at once "
                    "to a -c 4 worker (prefetch 1), read every tick",
             "tick_seconds": tick,
             "readings": [[d, None if a is None else round(a, 3)] for d, a in readings]}
    out.write_text(json.dumps(trace, indent=1) + "\n")
    peak = max(a for _, a in readings if a is not None)
    print(f"recorded {len(readings)} readings into {out}: peak depth "
          f"{max(d for d, _ in readings)}, oldest age peak {peak:.2f} s")
    return trace


def soak(runs: int, hogs: int = 0, pytest_args=()) -> int:
    """Run the whole suite ``runs`` times in a row, ``hogs`` busy loops beside it; 0 if all green."""
    import re
    results = []
    print(f"# soak: {runs} run(s) of the whole suite, {hogs} busy-loop process(es) beside it "
          f"({os.cpu_count()} cores)", flush=True)
    for n in range(1, runs + 1):
        from celerylab.reference import busy_loop
        busy = [busy_loop() for _ in range(hogs)]
        t0 = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", "celerylab", "test", "-q", "-p",
                                   "no:cacheprovider", *pytest_args], cwd=ROOT,
                                  capture_output=True, text=True)
        finally:
            for b in busy:
                b.kill()
                b.wait()
        took = time.monotonic() - t0
        out = proc.stdout + proc.stderr
        summary = next((line.strip("= ") for line in reversed(out.splitlines())
                        if re.search(r"\d+ (passed|failed)", line)), "no summary")
        failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)))
        results.append(proc.returncode == 0)
        from celerylab.processes import home  # each run's whole output (slowest items, per file)
        log = home() / "soak" / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{n}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(out)
        if proc.returncode:
            failed.append(f"(full output: {log})")
        print(f"run {n}: {'PASS' if proc.returncode == 0 else 'FAIL'}  {took:6.0f} s  {summary}"
              f"  ({log.name})", flush=True)
        for test in failed:
            print(f"    failed: {test}", flush=True)
        if proc.returncode and not failed:
            print("    " + "\n    ".join(out.strip().splitlines()[-15:]), flush=True)
    print(f"# soak: {sum(results)}/{runs} green with {hogs} busy loop(s)")
    return 0 if all(results) else 1


def main(notebooks: bool = False, suite: bool = False, hogs: int = 0, only: str = "") -> int:
    print(f"# celerylab figures  ({os.cpu_count()} cores, Python {sys.version.split()[0]}"
          f"{f', {hogs} busy loop(s) beside' if hogs else ''})")
    from celerylab.reference import busy_loop
    busy = [busy_loop() for _ in range(hogs)]  # a room's laptop: other work beside the course
    try:
        figures = stack_figures()
        if notebooks:
            figures.update(notebook_times(only))
    finally:
        for b in busy:
            b.kill()
            b.wait()
    if suite:
        t0 = time.monotonic()
        code = subprocess.call([sys.executable, "-m", "celerylab", "test", "-q"], cwd=ROOT,
                               stdout=subprocess.DEVNULL)
        figures[f"whole test suite (exit {code}), s"] = time.monotonic() - t0
    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"{name:<{width}}  {value:8.2f}")
    return 0
