"""./course preflight: ready on this machine; a problem is one line with its fix, and exit 1."""

from __future__ import annotations

import subprocess
import sys
import time

from conftest import ROOT, course_env


def preflight(**env) -> tuple[int, str, float]:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "celerylab", "preflight"], cwd=ROOT,
                          env=course_env(**env), capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - t0


def test_preflight_says_ready_and_boots_a_real_worker_within_30_s():
    code, out, took = preflight()
    assert code == 0, out
    assert "READY" in out and "NOT READY" not in out
    assert "a prefork worker booted" in out and "ran a task" in out
    assert took < 30, f"preflight took {took:.1f} s"


def test_preflight_names_each_problem_with_its_fix_and_exits_1():
    code, out, took = preflight(REDIS_URL="redis://127.0.0.1:1/0")
    assert code == 1, out
    line = next(x for x in out.splitlines() if x.strip().startswith("FIX") and "redis" in x)
    assert "127.0.0.1:1" in line
    assert out.splitlines()[out.splitlines().index(line) + 1].strip().startswith("->")
    assert "NOT READY: 1 problem" in out and took < 20
