"""One answer's whole live check in a process of its own (tests/conftest.py: side_by_side).

A module of its own, so that a fresh process finds it (and the tests' conftest, not the root
one) by name."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent)
if sys.path[:1] != [TESTS]:  # `import conftest` in a test module means this folder's
    sys.path.insert(0, TESTS)


def judge_here(module: str, judge: str, params: dict, tries: int = 3,
               fork_launcher: bool = False) -> tuple[str, str]:
    """One answer's whole live check, in this process, on a stack and in a folder of its own.

    ``module.judge(stack, folder, **params)`` writes the answer and calls the checker. Returns
    ("pass", what it printed), ("fail", the hint), ("busy", why: the checker's own reference said
    the machine was too busy, ``tries`` times) or ("error", a traceback: the test's own bug)."""
    import contextlib
    import importlib
    import io
    import shutil
    import tempfile
    import traceback

    from celerylab.celery_worker import import_worker
    from celerylab.checks import LabCheckFailed, MachineTooBusy
    from celerylab.processes import Launcher
    from celerylab.stack import Stack
    fn = getattr(importlib.import_module(module), judge)
    cwd, env = os.getcwd(), dict(os.environ)
    os.environ.pop("REDIS_URL", None)
    if fork_launcher and os.environ.get("CELERYLAB_WORKER_LAUNCH", "fork") != "exec":
        # a side-by-side process (never pytest's own): its answer's workers fork from a fork of
        # it, which has celery's worker imported (the fork server did), no task module, and no
        # thread yet; not from a fresh python importing it all again
        import_worker()
        Launcher.fork_here(hide=(TESTS, str(Path(TESTS).parent)))
    folder = tempfile.mkdtemp(prefix="celerylab-answer-")
    os.chdir(folder)
    sys.path.insert(0, folder)
    stack = None
    try:
        stack = Stack(f"t{uuid.uuid4().hex[:6]}").start()
        why = ""
        for _ in range(tries):
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    fn(stack, Path(folder), **params)
                return "pass", out.getvalue()
            except MachineTooBusy as exc:
                why = str(exc)
            except LabCheckFailed as exc:
                return "fail", str(exc)
        return "busy", why
    except Exception:
        return "error", traceback.format_exc()
    finally:
        if stack is not None:
            stack.stop()
        os.chdir(cwd)
        sys.path.remove(folder)
        os.environ.clear()
        os.environ.update(env)
        shutil.rmtree(folder, ignore_errors=True)
