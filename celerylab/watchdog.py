"""Parent-death watchdog: kills what a kernel started when the kernel goes away.

The kernel starts this process with a pipe on its stdin and writes ``+PGID`` / ``-PGID`` lines as it
starts and stops process groups (Redis servers, Celery workers). When the kernel exits in any way,
SIGKILL included, the pipe reaches end-of-file and every group still registered is terminated.
Portable (Linux and macOS), no polling.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def terminate(groups: set[int], grace: float = 2.0) -> None:
    for pgid in groups:  # TERM the leader (a worker's main process), then KILL the whole group
        try:
            os.kill(pgid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    alive = set(groups)
    while alive and time.monotonic() < deadline:
        alive = {g for g in alive if _exists(g)}
        time.sleep(0.05)
    for pgid in alive:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass


def _exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an interrupt in the kernel is not our business
    groups: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if line[:1] == "+":
            groups.add(int(line[1:]))
        elif line[:1] == "-":
            groups.discard(int(line[1:]))
    terminate(groups)


if __name__ == "__main__":
    main()
