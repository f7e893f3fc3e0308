"""Lab 5 (retries and dead letters): the checker accepts right answers and rejects wrong ones,
with a busy-loop process running beside it."""

from __future__ import annotations

import nbformat
import pytest
from conftest import ROOT, solution_function

from celerylab.checks import LabCheckFailed, check_lab05

pytestmark = pytest.mark.usefixtures("hog")


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
