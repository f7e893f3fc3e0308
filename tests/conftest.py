"""Fixtures that give each test a live stack of its own: a private Redis, real workers."""

from __future__ import annotations

import os
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidebyside import judge_here  # noqa: E402

import celerylab.checks.common  # noqa: E402

# Tests call checkers directly and retry a too-busy verdict themselves (expect_verdict); the
# notebooks' kernels (nbval) keep the checkers' own retries.
celerylab.checks.common.BUSY_RETRIES = 0

TASKS = '''
import os
import time

from celery import Celery

app = Celery("{name}", broker=os.environ["CELERYLAB_BROKER_URL"],
             backend=os.environ["CELERYLAB_BROKER_URL"])
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                broker_connection_retry_on_startup=True)


@app.task
def add(x, y):
    return x + y


@app.task
def nap(seconds):
    time.sleep(seconds)
    return seconds
'''


@pytest.fixture
def stack(monkeypatch):
    from celerylab.stack import Stack
    monkeypatch.delenv("REDIS_URL", raising=False)
    s = Stack(f"t{uuid.uuid4().hex[:6]}").start()
    yield s
    s.stop()


@pytest.fixture
def tasks_module(tmp_path, monkeypatch):
    """Write a small task module into a temp folder and return its name (importable there)."""
    name = f"tasks_{uuid.uuid4().hex[:6]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(TASKS.format(name=name)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


# Services the suite requires when CI is set (tests skip without them elsewhere), by name and the
# port the suite reaches them on. The GitHub workflow must start each (test_static checks).
CI_SERVICES = {"rabbitmq": 5672}


def course_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERYLAB_", "REDIS_URL"))}
    env.update(extra)
    return env


def solution_function(lab: str, name: str):
    """Execute the solution notebook's cell that defines ``name`` and return the function."""
    import base64
    import json
    import time

    import nbformat
    nb = nbformat.read(ROOT / "solutions" / f"{lab}.ipynb", as_version=4)
    scope = {"json": json, "base64": base64, "time": time}
    cell = next(c for c in nb.cells if c.cell_type == "code" and f"def {name}(" in c.source)
    exec(compile(cell.source, lab, "exec"), scope)
    return scope[name]


def right_answer(item) -> bool:
    """A test of a right answer: its name says it accepts, or its expected hint is None."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "accepts" in item.originalname or ("hint" in params and params["hint"] is None)


@pytest.fixture
def hog(request):
    """One busy-loop process beside the test: checkers must judge right on a busy machine.

    Every run puts it beside each lab's solution (the tests that exist for it: a checker must
    not reject a right answer because the machine is busy). The soak (``bench --soak N --hog K``)
    runs the whole suite beside busy loops of its own, so paying a core on every run beside every
    answer proves nothing more. CELERYLAB_HOG=right: beside every right answer; =all: beside
    the wrong answers too; =none: no busy loop at all."""
    mode = os.environ.get("CELERYLAB_HOG", "solution")
    wanted = {"all": True, "right": right_answer(request.node),
              "solution": right_answer(request.node) and "solution" in request.node.name}
    if not wanted.get(mode, False):
        yield None
        return
    from celerylab.reference import busy_loop
    proc = busy_loop()
    yield proc
    proc.kill()
    proc.wait()


def expect_verdict(check, *args, hint: str | None = None, tries: int = 3):
    """Run a checker: with ``hint=None`` it must pass, else fail with a hint matching ``hint``.

    ``MachineTooBusy`` (decided by the checker's own reference measurement, never by the answer)
    is no verdict: try again, and skip only if the machine stays too busy to judge every time.
    """
    from celerylab.checks import LabCheckFailed, MachineTooBusy
    why = ""
    for _ in range(tries):
        try:
            check(*args)
        except MachineTooBusy as exc:
            why = str(exc)
        except LabCheckFailed as exc:
            return assert_verdict(("fail", str(exc)), hint)
        else:
            return assert_verdict(("pass", ""), hint)
    assert_verdict(("busy", why), hint)


# --- answers judged side by side ----------------------------------------------------------------
# A lab's live check mostly waits (retry countdowns, crashes, a stalled queue): lab 5's module used
# 10% of this machine's two cores run one answer after another. So a lab's answers are judged K at a
# time, each in a process of its own with its own Redis, worker(s) and folder: exactly the check a
# learner runs, beside other checks instead of after them. Each answer is still its own test item.
# The lab's solution stays in its test's own turn, beside the busy loop (fixture hog).
# CELERYLAB_SIDE_BY_SIDE=1: one after another, in the test's own turn (as before).
SIDE_BY_SIDE = int(os.environ.get("CELERYLAB_SIDE_BY_SIDE", "4"))


@pytest.fixture(scope="module")
def side_by_side(request):
    """The verdicts of this module's answers that are judged side by side, by test item id.

    Gathers the module's collected items whose test asks for ``verdict`` (so ``-k`` runs only
    what it selects), leaves out the solution's (judged in its own turn, beside the busy loop),
    and judges the rest SIDE_BY_SIDE at a time, each in a fresh process."""
    import concurrent.futures
    import multiprocessing
    items = [i for i in request.session.items
             if getattr(i, "module", None) is request.module
             and "verdict" in getattr(i, "fixturenames", ())
             and not alone(i)]
    if SIDE_BY_SIDE <= 1 or not items:
        return {}
    # each answer's process is a fork of a server that imported what the checks need once (not
    # a second of imports each), and has none of pytest's threads; it finds the tests by PYTHONPATH
    # (a fork server ignores sys.path on Python 3.11), set only while it starts
    from multiprocessing import forkserver
    ctx = multiprocessing.get_context("forkserver")
    forkserver.set_forkserver_preload(
        ["sidebyside", "celerylab.stack", "celerylab.checks", "celery.app.control",
         # what each answer's worker launcher needs (celerylab.celery_worker.import_worker)
         "celery.apps.worker", "celery.worker.consumer", "celery.concurrency.prefork",
         "kombu.transport.redis", "celery.backends.redis", "billiard.pool",
         *sorted(p.stem for p in (ROOT / "tests").glob("test_lab[0-9]*.py"))])
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT)])
    try:
        forkserver.ensure_running()
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    with concurrent.futures.ProcessPoolExecutor(SIDE_BY_SIDE, mp_context=ctx,
                                                max_tasks_per_child=1) as pool:
        futures = {i.nodeid: pool.submit(judge_here, request.module.__name__, "judge",
                                         getattr(getattr(i, "callspec", None), "params", {}),
                                         fork_launcher=True)
                   for i in items}
        return {nodeid: f.result() for nodeid, f in futures.items()}


def pytest_collection_modifyitems(items):
    """The first answer judged side by side also waits for the others (the batch runs in its
    set-up): a time-out for the whole batch, not one check."""
    for item in items:
        if "verdict" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(900))


def alone(item) -> bool:
    """Judged in its own turn: the lab's solution (beside the busy loop), or every answer when
    the busy loop runs beside right answers or all of them (CELERYLAB_HOG=right/all)."""
    mode = os.environ.get("CELERYLAB_HOG", "solution")
    return "solution" in item.name or (mode == "right" and right_answer(item)) or mode == "all"


@pytest.fixture
def verdict(request, side_by_side, hog):
    """This test's answer's verdict: judged side by side with the module's others, or now."""
    found = side_by_side.get(request.node.nodeid)
    if found is None:
        params = getattr(getattr(request.node, "callspec", None), "params", {})
        found = judge_here(request.module.__name__, "judge", params)
    return found


def assert_verdict(verdict: tuple[str, str], hint: str | None) -> str:
    """A right answer (``hint=None``) passed; a wrong one failed with a hint matching ``hint``.
    Returns what the check printed or said."""
    import re
    kind, text = verdict
    if kind == "error":
        pytest.fail(f"the test's judge raised:\n{text}")
    if kind == "busy":
        pytest.skip(f"the machine was too busy to judge, every time it was tried (last: {text})")
    if hint is None:
        if kind == "fail":
            pytest.fail(f"a right answer was rejected: {text}")
    else:
        if kind == "pass":
            pytest.fail(f"a wrong answer was accepted (expected a hint matching {hint!r})")
        assert re.search(hint, text), f"expected a hint matching {hint!r}, got: {text}"
    return text


def open_course(**env):
    """Start ``./course open`` as a learner does (own process group); wait for its ready line.
    Returns (process, url, token, port, output lines so far); the caller stops the process."""
    import re
    import subprocess
    import time
    env = course_env(CELERYLAB_NO_BROWSER="1", **env)
    if "CELERYLAB_VENV" in os.environ:
        env["CELERYLAB_VENV"] = os.environ["CELERYLAB_VENV"]
    proc = subprocess.Popen([str(ROOT / "course"), "open"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen, found = [], None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and found is None:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        found = re.search(r"The course is open:\s+(http://127\.0\.0\.1:(\d+))/lab(/tree/\S+)?"
                          r"\?token=(\w+)", line)
    if found is None:
        stop_course(proc)
        raise AssertionError("no ready URL printed:\n" + "".join(seen[-30:]))

    def drain():  # keep reading, so JupyterLab never blocks on a full pipe
        for line in proc.stdout:
            seen.append(line)
    import threading
    threading.Thread(target=drain, daemon=True).start()
    return proc, found.group(1), found.group(4), int(found.group(2)), seen


def stop_course(proc, sig=None, group: bool = True) -> None:
    """Stop an open command as a terminal's Ctrl-C does (SIGINT to the group), or ``sig``."""
    import signal
    import subprocess
    send = os.killpg if group else os.kill
    send(proc.pid, sig or signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)

