"""A learner's paths beyond one Run All, in a real kernel: a setup cell re-run in the middle of a
notebook, a cell re-run alone afterwards, a broker that dies while a course helper waits on it.

(Every chapter and solution notebook also runs twice in one kernel under nbval: conftest.py at the
repository's root.)
"""

from __future__ import annotations

import nbformat
from conftest import TASKS
from nbclient import NotebookClient


def run_cells(tmp_path, *sources: str) -> list:
    """Run code cells in one fresh kernel (errors allowed); return the executed cells."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    client = NotebookClient(nb, timeout=60, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return nb.cells


def text_of(cell) -> str:
    parts = []
    for out in cell.outputs:
        parts += [out.get("text", ""), out.get("ename", ""), out.get("evalue", ""),
                  *out.get("traceback", []), str(out.get("data", {}).get("text/plain", ""))]
    return "\n".join(parts)


def errors_of(cell) -> list:
    return [o for o in cell.outputs if o.output_type == "error"]


SETUP = "import celerylab\nstack = celerylab.start('paths')"


def test_a_setup_cell_run_again_then_the_cells_after_it(tmp_path):
    """Setup, import, send; setup again: a cell that uses the old import alone says, in one line,
    which cell to run first; after that cell, the same send works on the new stack."""
    (tmp_path / "paths_tasks.py").write_text(TASKS.format(name="paths_tasks"))
    cells = run_cells(
        tmp_path, SETUP, "import paths_tasks\nfirst = paths_tasks.add.delay(1, 2).id",
        SETUP,
        "paths_tasks.add.delay(1, 2)",  # re-run alone: the module still points at the old Redis
        "import paths_tasks\nsecond = paths_tasks.add.delay(1, 2).id\n"
        "assert paths_tasks.app.conf.broker_url == stack.url\n"
        "assert stack.redis.llen('celery') == 1\nprint('sent on the new stack')",
        "stack.stop()")
    assert not any(errors_of(c) for c in cells[:3]), [text_of(c) for c in cells[:3]]
    said = text_of(cells[3])
    assert errors_of(cells[3]) and "run the cell that imports paths_tasks again" in said, said
    assert "Traceback" not in said and "OperationalError" not in said, said
    assert len([line for line in said.splitlines() if line.strip()]) <= 3, said
    assert not errors_of(cells[4]) and "sent on the new stack" in text_of(cells[4]), \
        text_of(cells[4])


def test_a_result_of_the_old_stack_let_go_on_a_second_run(tmp_path):
    """Run All twice: the second run's ``sent = ....delay()`` drops the first run's AsyncResult,
    whose Redis is gone. Its unsubscribe must not reach for that Redis (celery retries ~19 s, then
    prints "Retry limit exceeded" into the cell)."""
    (tmp_path / "paths_tasks.py").write_text(TASKS.format(name="paths_tasks"))
    send = "import paths_tasks\nsent = [paths_tasks.add.delay(1, 2) for _ in range(3)]\nprint('sent')"
    cells = run_cells(tmp_path, SETUP, send, SETUP, send, "stack.stop()")
    said = text_of(cells[3])
    assert not any(errors_of(c) for c in cells), [text_of(c) for c in cells]
    assert "sent" in said and "Retry limit" not in said and "Exception ignored" not in said, said


def test_a_broker_killed_while_a_course_helper_waits(tmp_path):
    """The notebook's Redis is SIGKILLed while ``stack.wait_for`` polls it: the cell ends with the
    course's message (what died, the cell to re-run), not redis-py's traceback."""
    cells = run_cells(
        tmp_path, SETUP,
        "import os, signal, threading, time\n"
        "threading.Timer(0.5, os.kill, (stack.server.pid, signal.SIGKILL)).start()\n"
        "t0 = time.monotonic()\n"
        "try:\n"
        "    stack.wait_for(['never-sent'], timeout=30)\n"
        "finally:\n"
        "    print(f'took {time.monotonic() - t0 - 0.5:.1f} s')",
        SETUP + "\nassert stack.health()\nstack.stop()")
    said = text_of(cells[1])
    assert errors_of(cells[1]), said
    assert "Redis (pid" in said and "is gone" in said and "Re-run the setup cell" in said, said
    assert "redis.exceptions" not in said and "Traceback" not in said, said
    took = float(said.split("took ")[1].split()[0])
    assert took < 10, f"the error came {took} s after the kill (a hang guard; ~0 s here)"
    assert not errors_of(cells[2]), text_of(cells[2])  # the setup cell, re-run, is the way out

