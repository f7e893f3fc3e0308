"""The figures of docs/benchmarks.md, measured on this machine. Printed, never asserted.

    ./course bench                 broker and worker readiness, stop time, memory
    ./course bench --notebooks     also each notebook's wall time (run one after another)
    ./course bench --notebooks --hog 1
                                   the same with a busy loop beside (a laptop doing other work)
    ./course bench --suite         also the whole test suite's wall time
    ./course bench --soak N [--hog K]
                                   the whole suite N times in a row, with K busy-loop processes
                                   beside it: pass/fail per run and the failing tests
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


def notebook_times() -> dict:
    import nbformat
    from nbclient import NotebookClient
    times = {}
    for d in ("notebooks", "solutions"):
        for nb_path in sorted((ROOT / d).glob("*.ipynb")):
            nb = nbformat.read(nb_path, as_version=4)
            t0 = time.monotonic()
            NotebookClient(nb, timeout=300, kernel_name="python3",
                           resources={"metadata": {"path": str(nb_path.parent)}}).execute()
            times[f"{d}/{nb_path.name}, s"] = time.monotonic() - t0
    return times


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
        if proc.returncode:  # keep the whole output of a failing run
            from celerylab.processes import home
            log = home() / "soak" / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{n}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(out)
            failed.append(f"(full output: {log})")
        print(f"run {n}: {'PASS' if proc.returncode == 0 else 'FAIL'}  {took:6.0f} s  {summary}",
              flush=True)
        for test in failed:
            print(f"    failed: {test}", flush=True)
        if proc.returncode and not failed:
            print("    " + "\n    ".join(out.strip().splitlines()[-15:]), flush=True)
    print(f"# soak: {sum(results)}/{runs} green with {hogs} busy loop(s)")
    return 0 if all(results) else 1


def main(notebooks: bool = False, suite: bool = False, hogs: int = 0) -> int:
    print(f"# celerylab figures  ({os.cpu_count()} cores, Python {sys.version.split()[0]}"
          f"{f', {hogs} busy loop(s) beside' if hogs else ''})")
    from celerylab.reference import busy_loop
    busy = [busy_loop() for _ in range(hogs)]  # a room's laptop: other work beside the course
    try:
        figures = stack_figures()
        if notebooks:
            figures.update(notebook_times())
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
