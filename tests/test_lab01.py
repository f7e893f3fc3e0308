"""Lab 1 (pending messages): the checker accepts right answers and rejects wrong ones,
with a busy-loop process running beside it."""

from __future__ import annotations

import json

import pytest
from conftest import solution_function

from celerylab.checks import LabCheckFailed, check_lab01

pytestmark = pytest.mark.usefixtures("hog")


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
