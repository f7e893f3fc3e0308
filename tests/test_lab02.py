"""Lab 2 (pools for the work): the checker accepts right answers and rejects wrong ones,
with a busy-loop process running beside it."""

from __future__ import annotations

import pytest
from conftest import solution_function

from celerylab.checks import LabCheckFailed, check_lab02

pytestmark = pytest.mark.usefixtures("hog")


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
