"""Lab 3 (routes and layout): the checker accepts right answers and rejects wrong ones,
with a busy-loop process beside the solution and the other answers judged side by side
(conftest.side_by_side; the soak: beside all of it)."""

from __future__ import annotations

import pytest
from conftest import assert_verdict, solution_function

from celerylab.checks import check_lab03

pytestmark = pytest.mark.usefixtures("hog")


FAST, SLOW, BULKY = ("celerylab.workloads.lookup", "celerylab.workloads.render_report",
                     "celerylab.workloads.import_catalog")


def judge(stack, folder, plan="solution", **_):
    """One answer's live check (conftest.judge_here): the solution's routing_plan, a plan, or
    None for the unwritten stub."""
    if plan == "solution":
        routing_plan = solution_function("lab03_routing_layout", "routing_plan")
    else:
        def routing_plan():
            if plan is None:
                raise NotImplementedError
            return plan
    check_lab03(routing_plan, stack)


def test_lab03_checker_accepts_the_solution(verdict):
    assert "Lab 3 passed" in assert_verdict(verdict, None)


def _plan(routes, *workers):
    return {"routes": routes, "workers": list(workers)}


def route_by_name(name, *args, **kwargs):
    return {"queue": name.split(".")[3]}


ONE_QUEUE = {FAST: {"queue": "work"}, SLOW: {"queue": "work"}, BULKY: {"queue": "work"}}
SEPARATE = {FAST: {"queue": "fast"}, SLOW: {"queue": "slow"}, BULKY: {"queue": "bulky"}}


@pytest.mark.parametrize("plan", [
    # glob routes, a threads pool for the lookups, another split of the budget
    _plan({FAST: {"queue": "fast"}, "celerylab.workloads.render_*": {"queue": "reports"},
           "celerylab.workloads.import_*": {"queue": "imports"}},
          {"queues": ["fast"], "concurrency": 2, "pool": "threads"},
          {"queues": ["reports"], "concurrency": 3},
          {"queues": ["imports"], "concurrency": 1, "max_memory_per_child": 100 * 1024}),
    # Celery's other recycling flag: --max-tasks-per-child 1 on the imports' worker
    _plan(SEPARATE, {"queues": ["fast"], "concurrency": 1},
          {"queues": ["slow"], "concurrency": 4},
          {"queues": ["bulky"], "concurrency": 1, "max_tasks_per_child": 1}),
    # routes by exchange and routing key (Celery declares `-Q fast` with an exchange and a
    # routing key of that name), and a learner's name that looks like a default one
    _plan({FAST: {"exchange": "fast", "routing_key": "fast"},
           SLOW: {"exchange": "bulk", "routing_key": "bulk"},
           BULKY: {"exchange": "bulk", "routing_key": "bulk"}},
          {"queues": ["fast"], "concurrency": 2, "pool": "threads", "name": "lab03-1"},
          {"queues": ["bulk"], "concurrency": 4, "max_memory_per_child": 100 * 1024}),
], ids=["globs-threads-another-split", "a-fresh-child-per-task",
        "exchange-routes-and-default-names"])
def test_lab03_checker_accepts_unusual_plans(verdict, plan):
    assert "Lab 3 passed" in assert_verdict(verdict, None)


@pytest.mark.parametrize("plan, hint", [
    (None, "not written yet"),
    (_plan(ONE_QUEUE, {"queues": ["work"], "concurrency": 6}), "waited in the queue 'work'"),
    (_plan(SEPARATE, {"queues": ["fast", "slow"], "concurrency": 4},  # its only fault
           {"queues": ["bulky"], "concurrency": 1, "max_memory_per_child": 100 * 1024}),
     "which also serves other work"),
    (_plan({FAST: {"queue": "fast"}, SLOW: {"queue": "slow"}},
           {"queues": ["fast"], "concurrency": 1}, {"queues": ["slow"], "concurrency": 4}),
     "'celery', which no worker consumes"),
    (_plan(SEPARATE, {"queues": ["fast"], "concurrency": 1},
           {"queues": ["slow"], "concurrency": 4}, {"queues": ["bulky"], "concurrency": 1}),
     "Both imports of import_catalog ran in one child"),
    # a cap above one import (150 MiB + a child's 50): the child is replaced after the second only
    (_plan(SEPARATE, {"queues": ["fast"], "concurrency": 1},
           {"queues": ["slow"], "concurrency": 4},
           {"queues": ["bulky"], "concurrency": 1, "max_memory_per_child": 300 * 1024}),
     "Both imports of import_catalog ran in one child"),
    # two children, no cap: each import in a child of its own, both kept alive
    (_plan(SEPARATE, {"queues": ["fast"], "concurrency": 1},
           {"queues": ["slow"], "concurrency": 3}, {"queues": ["bulky"], "concurrency": 2}),
     "still alive|ran in one child"),  # (both true of no recycling: which one shows, by chance)
    # a setting the lab does not pass on must not be dropped silently
    (_plan(SEPARATE, {"queues": ["fast"], "concurrency": 1}, {"queues": ["slow"], "concurrency": 4},
           {"queues": ["bulky"], "concurrency": 1, "max_memory_per_child_kib": 100 * 1024}),
     "'max_memory_per_child_kib', which this lab does not pass"),
    (_plan(SEPARATE, {"queues": ["fast"], "concurrency": 4},
           {"queues": ["slow"], "concurrency": 4}, {"queues": ["bulky"], "concurrency": 1}),
     "budget"),
    (_plan(SEPARATE, {"queues": ["fast", "bulky"], "concurrency": 3, "pool": "threads"},
           {"queues": ["slow"], "concurrency": 3}), "same worker as the lookups"),
    (_plan(SEPARATE, {"queues": ["fast"], "concurrency": 1, "name": "w"},
           {"queues": ["slow"], "concurrency": 4, "name": "w"},
           {"queues": ["bulky"], "concurrency": 1, "name": "x"}), "Two workers share the name 'w'"),
    (_plan(SEPARATE, {"queues": ["fast"], "concurrency": 1}, {"queues": ["slow"], "concurrency": 4},
           {"queues": ["bulky"], "concurrency": 1, "max_memory_per_child": 100000.0}),
     "whole number of KiB"),
    (_plan(SEPARATE, {"queues": ["fast"], "concurrency": 1}, {"queues": ["slow"], "concurrency": 4},
           {"queues": ["bulky"], "concurrency": 1, "pool": "threads",
            "max_memory_per_child": 100 * 1024}), "main process"),
    (_plan(SEPARATE, {"queues": "fast", "concurrency": 1}, {"queues": ["slow"], "concurrency": 4},
           {"queues": ["bulky"], "concurrency": 1}), "list of queue names"),
    (_plan([route_by_name], {"queues": ["fast"], "concurrency": 1}),
     "could not apply your routes"),
])
def test_lab03_checker_rejects_wrong_plans(verdict, plan, hint):
    assert_verdict(verdict, hint)
