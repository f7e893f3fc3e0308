"""References measured side by side with an experiment, so that a verdict survives a busy machine.

A laptop in a workshop or a CI runner is never idle: another notebook, a build, a browser. A claim
such as "two processes run on two cores" is only fair against what the machine gives *right now*,
so the course measures that first, with plain processes that know nothing of Celery, and compares.
"""

from __future__ import annotations

import json
import subprocess
import sys

# A busy loop for load tests (the suite's `hog` fixture, `./course bench --soak N --hog K`): it
# spins on the CPU and ends by itself when the process that started it is gone.
_BUSY_LOOP = "import os, sys\nparent = int(sys.argv[1])\nwhile os.getppid() == parent:\n    pass\n"


def busy_loop():
    """Start one busy-loop process (a subprocess.Popen); it dies with this process."""
    import os
    return subprocess.Popen([sys.executable, "-c", _BUSY_LOOP, str(os.getpid())])

# One burn: the same pure-Python loop as the CPU-bound tasks of chapter 2 and lab 2.
_BURNER = """
import json, sys, time
n, rounds = int(sys.argv[1]), int(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()                      # wait for "go": the burners start together
t0 = time.time()
for _ in range(rounds):
    sum(i * i for i in range(n)) % 7
print(json.dumps([t0, time.time()]), flush=True)
"""


def _burners(count: int, n: int, rounds: int) -> float:
    """Wall seconds for ``count`` processes each burning ``rounds`` x ``n`` at the same time."""
    procs = [subprocess.Popen([sys.executable, "-c", _BURNER, str(n), str(rounds)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(count)]
    try:
        for p in procs:  # every interpreter is up before any burn starts
            p.stdout.readline()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        spans = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return max(end for _, end in spans) - min(start for start, _ in spans)


def cpu_parallelism(n: int = 1_500_000, rounds: int = 4) -> dict:
    """How many cores two CPU-bound processes get right now, measured.

    The same work (``rounds`` burns of ``n``) runs once in one process (serial) and once split over
    two processes (parallel). ``parallelism`` = serial / parallel: about 2.0 when two cores are
    free, about 1.0 when only one is (the other taken by whatever else runs).
    """
    serial = _burners(1, n, rounds)
    parallel = _burners(2, n, rounds // 2)
    return {"serial s": serial, "parallel s": parallel, "parallelism": serial / parallel}
