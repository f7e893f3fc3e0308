"""The lab contract: one source per lab, generated copies in sync, unsolved labs never pass.

Each lab's checker has its own test module (tests/test_labNN.py).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from celerylab.checks import LabCheckFailed
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


def test_a_check_on_a_stopped_stack_says_so_and_how_to_restart(stack):
    from celerylab.checks import check_lab06
    from celerylab.errors import CourseError
    stack.stop()
    with pytest.raises(CourseError, match="stack is not running.*Re-run the setup cell"):
        check_lab06(lambda: {"prefetch_multiplier": 1, "acks_late": True, "concurrency": 2},
                    stack)


def test_a_check_called_with_the_wrong_arguments_says_so(stack):
    from celerylab.checks import check_lab06
    from celerylab.errors import CourseError
    with pytest.raises(CourseError, match=r"check_lab06\(worker_settings, stack\).*wrong arguments"):
        check_lab06(lambda: {})


def test_a_check_the_machine_was_too_busy_for_runs_again_by_itself(stack, monkeypatch, capsys):
    """In a notebook a too-busy verdict is retried (BUSY_RETRIES times), then reported."""
    from celerylab.checks import MachineTooBusy, common
    monkeypatch.setattr(common, "BUSY_RETRIES", 2)
    calls = []

    @common.checker
    def check_busy_twice(stack, busy_times):
        calls.append(1)
        if len(calls) <= busy_times:
            raise MachineTooBusy("a reference said so")
        return "judged"

    assert check_busy_twice(stack, 2) == "judged" and len(calls) == 3
    assert "checking again (2 of 2)" in capsys.readouterr().out
    calls.clear()
    with pytest.raises(MachineTooBusy, match="a reference said so"):
        check_busy_twice(stack, 3)
    assert len(calls) == 3
