"""The lab contract: one source per lab, generated copies in sync, checkers that can fail."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from celerylab.checks import (
    LabCheckFailed,
    check_lab01,
    check_lab02,
    check_lab03,
    check_lab04,
    check_lab05,
)
from celerylab.labgen import STUB, SourceError, build, split_solution

ROOT = Path(__file__).resolve().parents[1]
LABS = sorted((ROOT / "labs").glob("*.ipynb"))


def test_generated_notebooks_match_their_sources():
    drift = build(check=True)
    assert not drift, f"out of date (run ./course build): {[str(p) for p in drift]}"


def code_of(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def test_every_lab_has_a_solution_and_a_stub():
    assert LABS, "no labs generated"
    for lab in LABS:
        solution = ROOT / "solutions" / lab.name
        assert solution.exists()
        lab_code, solution_code = code_of(lab), code_of(solution)
        assert STUB in lab_code and STUB not in solution_code
        assert "BEGIN SOLUTION" not in lab_code + solution_code


def test_split_solution_keeps_indentation_and_rejects_bad_markers():
    code = "def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION\n"
    assert split_solution(code, keep=True, where="t") == "def f():\n    return 1"
    assert split_solution(code, keep=False, where="t") == f"def f():\n    {STUB}"
    with pytest.raises(SourceError):
        split_solution("### BEGIN SOLUTION\nx = 1\n", keep=True, where="t")


def solution_function(lab: str, name: str):
    """Execute the solution notebook's cell that defines ``name`` and return the function."""
    nb = nbformat.read(ROOT / "solutions" / f"{lab}.ipynb", as_version=4)
    scope = {"json": json, "base64": base64}
    cell = next(c for c in nb.cells if c.cell_type == "code" and f"def {name}(" in c.source)
    exec(compile(cell.source, lab, "exec"), scope)
    return scope[name]


def test_lab01_checker_accepts_the_solution(stack, capsys):
    check_lab01(solution_function("lab01_pending_messages", "pending_messages"), stack)
    assert "Lab 1 passed" in capsys.readouterr().out


def _stub(r, queue):
    raise NotImplementedError


def _consumes(r, queue):
    solved = solution_function("lab01_pending_messages", "pending_messages")
    out = solved(r, queue)
    r.delete(queue)
    return out


def _newest_first(r, queue):
    return solution_function("lab01_pending_messages", "pending_messages")(r, queue)[::-1]


def _undecoded(r, queue):
    out = []
    for raw in reversed(r.lrange(queue, 0, -1)):
        env = json.loads(raw)
        out.append({"task": env["headers"]["task"], "id": env["headers"]["id"],
                    "args": env["body"], "kwargs": {}, "retries": 0, "eta": None})
    return out


def _no_eta(r, queue):
    return [{**m, "eta": None}
            for m in solution_function("lab01_pending_messages", "pending_messages")(r, queue)]


@pytest.mark.parametrize("wrong, hint", [
    (_stub, "not written yet"),
    (_consumes, "consumed"),
    (_newest_first, "wrong order"),
    (_undecoded, "encoded"),
    (_no_eta, "ETA"),
])
def test_lab01_checker_rejects_wrong_answers(stack, wrong, hint):
    with pytest.raises(LabCheckFailed, match=hint):
        check_lab01(wrong, stack)


def test_check_failures_render_without_a_traceback():
    lines = LabCheckFailed("first line\nsecond").__class__("first line\nsecond")._render_traceback_()
    assert "first line" in lines[0] and lines[1] == "second"


@pytest.mark.parametrize("lab", LABS, ids=[p.stem for p in LABS])
def test_unsolved_lab_notebook_never_passes(lab):
    """Run the learner's copy: it must stop at a stub (or a failed check), never pass."""
    nb = nbformat.read(lab, as_version=4)
    client = NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(lab.parent)}})
    with pytest.raises(CellExecutionError) as err:
        client.execute()
    assert "NotImplementedError" in str(err.value) or "LabCheckFailed" in str(err.value)


# Lab 2 ---------------------------------------------------------------------------------------
def test_lab02_checker_accepts_the_solution(stack, capsys):
    check_lab02(solution_function("lab02_pool_and_concurrency", "choose_layout"), stack)
    assert "Lab 2 passed" in capsys.readouterr().out


@pytest.mark.parametrize("layout, hint", [
    (None, "not written yet"),
    ([{"pool": "solo", "concurrency": 1, "queues": ["cpu", "io"]}], "I/O-bound tasks took"),
    ([{"pool": "prefork", "concurrency": 2, "queues": ["cpu"]}], "No worker consumes the queue 'io'"),
    ([{"pool": "gevent", "concurrency": 2, "queues": ["cpu", "io"]}], "pool must be one of"),
])
def test_lab02_checker_rejects_wrong_layouts(stack, layout, hint):
    def choose_layout():
        if layout is None:
            raise NotImplementedError
        return layout

    with pytest.raises(LabCheckFailed, match=hint):
        check_lab02(choose_layout, stack)


# Lab 3 ---------------------------------------------------------------------------------------
FAST, SLOW, BULKY = ("celerylab.workloads.lookup", "celerylab.workloads.render_report",
                     "celerylab.workloads.import_catalog")


def test_lab03_checker_accepts_the_solution(stack, capsys):
    check_lab03(solution_function("lab03_routing_layout", "routing_plan"), stack)
    assert "Lab 3 passed" in capsys.readouterr().out


def _plan(routes, *workers):
    return {"routes": routes, "workers": list(workers)}


ONE_QUEUE = {FAST: {"queue": "work"}, SLOW: {"queue": "work"}, BULKY: {"queue": "work"}}
SEPARATE = {FAST: {"queue": "fast"}, SLOW: {"queue": "slow"}, BULKY: {"queue": "bulky"}}


@pytest.mark.parametrize("plan, hint", [
    (None, "not written yet"),
    (_plan(ONE_QUEUE, {"queues": ["work"], "concurrency": 6}), "waited in the queue 'work'"),
    (_plan(SEPARATE, {"queues": ["fast", "slow"], "concurrency": 4},
           {"queues": ["bulky"], "concurrency": 1}), "which also serves other work"),
    (_plan({FAST: {"queue": "fast"}, SLOW: {"queue": "slow"}},
           {"queues": ["fast"], "concurrency": 1}, {"queues": ["slow"], "concurrency": 4}),
     "'celery', which no worker consumes"),
    (_plan(SEPARATE, {"queues": ["fast"], "concurrency": 1},
           {"queues": ["slow"], "concurrency": 4}, {"queues": ["bulky"], "concurrency": 1}),
     "still alive"),
    (_plan(SEPARATE, {"queues": ["fast"], "concurrency": 4},
           {"queues": ["slow"], "concurrency": 4}, {"queues": ["bulky"], "concurrency": 1}),
     "budget"),
])
def test_lab03_checker_rejects_wrong_plans(stack, plan, hint):
    def routing_plan():
        if plan is None:
            raise NotImplementedError
        return plan

    with pytest.raises(LabCheckFailed, match=hint):
        check_lab03(routing_plan, stack)


# Lab 4 ---------------------------------------------------------------------------------------
def lab04_module(variant: str) -> str:
    """The solution's task module, or a wrong variant of it."""
    nb = nbformat.read(ROOT / "solutions" / "lab04_exactly_once_payments.ipynb", as_version=4)
    cell = next(c.source for c in nb.cells if c.source.startswith("%%writefile lab04_tasks.py"))
    code = cell.split("\n", 1)[1]
    if variant == "early ack":
        code = code.replace("app.conf.task_acks_late = True", "app.conf.task_acks_late = False")
    elif variant == "not idempotent":
        code = code.replace('CREDIT_ONCE(keys=[f"payment:{payment_id}", "balances"],',
                            'db.hincrby("balances", account, amount_cents) or (')
        code = code.replace("args=[amount_cents, 7 * 24 * 3600, account])", ")")
    elif variant == "stub":
        code = code.replace("app.conf.task_acks_late = True",
                            "raise NotImplementedError('your turn')")
    assert variant == "solution" or code != cell.split("\n", 1)[1], variant
    return code


@pytest.mark.parametrize("variant, hint", [
    ("solution", None),
    ("stub", "NotImplementedError"),
    ("early ack", "message is gone"),
    ("not idempotent", "acct-A holds 2000"),
])
def test_lab04_checker(stack, tmp_path, monkeypatch, capsys, variant, hint):
    (tmp_path / "lab04_tasks.py").write_text(lab04_module(variant))
    monkeypatch.chdir(tmp_path)
    if hint is None:
        check_lab04(stack)
        assert "Lab 4 passed" in capsys.readouterr().out
    else:
        with pytest.raises(LabCheckFailed, match=hint):
            check_lab04(stack)


# Lab 5 ---------------------------------------------------------------------------------------
def lab05_module(change: tuple[str, str] | None) -> str:
    nb = nbformat.read(ROOT / "solutions" / "lab05_retries_and_dead_letters.ipynb", as_version=4)
    code = next(c.source for c in nb.cells
                if c.source.startswith("%%writefile lab05_tasks.py")).split("\n", 1)[1]
    if change:
        assert change[0] in code, change
        code = code.replace(*change)
    return code


@pytest.mark.parametrize("change, replay, hint", [
    (None, "solution", None),
    (None, "stub", "replay_dead_letters is not written yet"),
    (('"retry_jitter": True', '"retry_jitter": False'), "solution", "jitter is off"),
    (('"autoretry_for": (DependencyDown,)', '"autoretry_for": (DependencyDown, InvalidOrder)'),
     "solution", "InvalidOrder would be retried"),
    (('"retry_backoff_max": 2', '"retry_backoff_max": 600'), "solution", "cap the backoff"),
    (("BASE = DeadLetterOnFailure", "BASE = app.Task"), "solution", "not in the dead-letter"),
    (('"max_retries": 3', '"max_retries": 1'), "solution", "allow 2 to 5 retries"),
])
def test_lab05_checker(stack, tmp_path, monkeypatch, capsys, change, replay, hint):
    (tmp_path / "lab05_tasks.py").write_text(lab05_module(change))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    replay_fn = solution_function("lab05_retries_and_dead_letters", "replay_dead_letters")
    if replay == "stub":
        def replay_fn(r, send_task):
            raise NotImplementedError
    if hint is None:
        check_lab05(replay_fn, stack)
        assert "Lab 5 passed" in capsys.readouterr().out
    else:
        with pytest.raises(LabCheckFailed, match=hint):
            check_lab05(replay_fn, stack)
