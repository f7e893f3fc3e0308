"""Lab 2 (pools for the work): the checker accepts right answers and rejects wrong ones,
with a busy-loop process beside the solution (the soak: beside all of it)."""

from __future__ import annotations

import pytest
from conftest import expect_verdict, solution_function

from celerylab.checks import check_lab02
from celerylab.checks.lab02 import cpu_reference

pytestmark = pytest.mark.usefixtures("hog")

IO_THREADS = {"pool": "threads", "concurrency": 30, "queues": ["io"]}


def layout_fn(layout):
    def choose_layout():
        if layout == "stub":
            raise NotImplementedError
        if layout == "raises":
            raise KeyError("pool")
        return layout
    return choose_layout


def test_lab02_checker_accepts_the_solution(stack, capsys):
    expect_verdict(check_lab02, solution_function("lab02_pool_and_concurrency", "choose_layout"),
                   stack)
    assert "Lab 2 passed" in capsys.readouterr().out


@pytest.mark.parametrize("layout", [
    ({"pool": "threads", "concurrency": 20, "queues": ("io",)},  # a tuple, io first, tuples
     {"pool": "prefork", "concurrency": 3, "queues": ("cpu",)}),
    [{"pool": "prefork", "concurrency": 4, "queues": ["cpu"]},  # more children than cores
     {"pool": "threads", "concurrency": 32, "queues": ["io"]}],
], ids=["tuples: threads -c 20 + prefork -c 3", "prefork -c 4 + threads -c 32"])
def test_lab02_checker_accepts_unusual_right_layouts(stack, layout):
    expect_verdict(check_lab02, layout_fn(layout), stack)


@pytest.mark.parametrize("layout, hint", [
    ("stub", "not written yet"),
    ("raises", "choose_layout raised KeyError"),
    ({"pool": "prefork", "concurrency": 2, "queues": ["cpu", "io"]}, "Return a list"),
    ([{"pool": "prefork", "concurrency": "2", "queues": ["cpu", "io"]}], "whole number"),
    ([{"pool": "gevent", "concurrency": 2, "queues": ["cpu", "io"]}], "pool must be one of"),
    ([{"pool": "prefork", "concurrency": 2, "queues": ["cpu"]}], "No worker consumes the queue 'io'"),
    ([{"pool": "solo", "concurrency": 1, "queues": ["cpu", "io"]}], "I/O-bound tasks only"),
    ([{"pool": "prefork", "concurrency": 2, "queues": ["cpu", "io"]}], "I/O-bound tasks"),
    ([{"pool": "solo", "concurrency": 1, "queues": ["cpu"]}, IO_THREADS], "never ran in two processes"),
    ([{"pool": "threads", "concurrency": 4, "queues": ["cpu"]}, IO_THREADS], "never ran in two processes"),
    ([{"pool": "threads", "concurrency": 32, "queues": ["cpu", "io"]},
      {"pool": "solo", "concurrency": 1, "queues": ["cpu"]}],
     "at once inside one process|I/O-bound tasks"),  # under load the waits suffer first
    ([{"pool": "prefork", "concurrency": 16, "queues": ["cpu", "io"]}], "I/O-bound tasks"),
    ([{"pool": "prefork", "concurrency": True, "queues": ["cpu", "io"]}], "whole number"),
    ([{"pool": "prefork", "concurrency": 2, "queues": "cpu"}, IO_THREADS], "list of queue names"),
], ids=["stub", "raises", "not a list", "concurrency as text", "gevent", "io not served",
        "solo for both", "prefork -c 2 for both", "solo for cpu", "threads for cpu",
        "threads for both plus solo", "prefork -c 16 for both", "concurrency True",
        "queues as text"])
def test_lab02_checker_rejects_wrong_layouts(stack, layout, hint):
    expect_verdict(check_lab02, layout_fn(layout), stack, hint=hint)


def fake_reference(monkeypatch, serial, parallel):
    import celerylab.checks.lab02 as lab02
    monkeypatch.setattr(lab02, "cpu_reference", lambda: {
        "serial s": serial, "parallel s": parallel, "parallelism": serial / parallel})


def test_the_speed_up_is_shown_never_blamed(stack, monkeypatch, capsys):
    """A reference so fast that any real run misses it: with no parallelism in the reference, the
    note says the machine is too busy; with parallelism, that the speed-up did not show this time.
    Either way the answer is judged on what holds on any machine (processes at once)."""
    solution = solution_function("lab02_pool_and_concurrency", "choose_layout")
    fake_reference(monkeypatch, 0.010, 0.0095)
    expect_verdict(check_lab02, solution, stack)
    out = capsys.readouterr().out
    assert "too busy to show a speed-up" in out and "Lab 2 passed" in out
    fake_reference(monkeypatch, 0.010, 0.005)
    expect_verdict(check_lab02, solution, stack)
    out = capsys.readouterr().out
    assert "no speed-up this time" in out and "Lab 2 passed" in out


def test_cpu_reference_measures_two_processes_against_one():
    ref = cpu_reference()
    assert ref["serial s"] > 0 and ref["parallel s"] > 0
    assert ref["parallelism"] == pytest.approx(ref["serial s"] / ref["parallel s"])
