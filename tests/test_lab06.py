"""Lab 6 (prefetch settings): the checker accepts right answers and rejects wrong ones, with a
busy-loop process beside the solution (the soak: beside all of it)."""

from __future__ import annotations

import pytest
from conftest import expect_verdict, solution_function

from celerylab import prefetch
from celerylab.checks import LabCheckFailed, check_lab06
from celerylab.checks.lab06 import run_lab06

pytestmark = pytest.mark.usefixtures("hog")


def _settings(**kw):
    return lambda: kw


def test_lab06_checker_accepts_the_solution(stack, capsys):
    expect_verdict(check_lab06, solution_function("lab06_prefetch_settings", "worker_settings"),
                   stack)
    assert "Lab 6 passed" in capsys.readouterr().out


def test_lab06_checker_accepts_disable_prefetch(stack, capsys):
    """Correct but unusual: Celery 5.6's --disable-prefetch, with early ack and multiplier 16."""
    expect_verdict(check_lab06, _settings(prefetch_multiplier=16, acks_late=False,
                                          concurrency=2, disable_prefetch=True), stack)
    assert "Lab 6 passed" in capsys.readouterr().out


@pytest.mark.parametrize("settings, hint", [
    (dict(prefetch_multiplier=4, acks_late=False, concurrency=2), r"held \d+ messages"),
    (dict(prefetch_multiplier=1, acks_late=False, concurrency=2), r"held \d+ messages"),
    (dict(prefetch_multiplier=4, acks_late=True, concurrency=2), r"held \d+ messages"),
    (dict(prefetch_multiplier=1, acks_late=True, concurrency=1), r"waited up to .* in Redis"
                                                                 r"|tasks ran at once"),
], ids=["default", "multiplier-1-early-ack", "acks-late-alone", "one-child"])
def test_lab06_checker_rejects_settings_that_keep_short_tasks_waiting(stack, settings, hint):
    expect_verdict(check_lab06, _settings(**settings), stack, hint=hint)


@pytest.mark.parametrize("settings, hint", [
    (None, "not written yet"),
    (dict(prefetch_multiplier=1, acks_late=True, concurrency=4), "over the budget"),
    (dict(prefetch_multiplier="1", acks_late=True, concurrency=2), "whole number"),
    (dict(prefetch_multiplier=1, acks_late="yes", concurrency=2), "True or False"),
    (dict(prefetch_multiplier=0, acks_late=True, concurrency=2), "at least 1"),
    (dict(prefetch_multiplier=1, concurrency=2), "lacks"),
    (dict(prefetch_multiplier=1, acks_late=True, concurrency=2, acks="late"), "Unknown key"),
    ([("prefetch_multiplier", 1)], "returns a dict"),
])
def test_lab06_checker_rejects_malformed_settings(stack, settings, hint):
    def worker_settings():
        if settings is None:
            raise NotImplementedError
        return settings

    with pytest.raises(LabCheckFailed, match=hint):
        check_lab06(worker_settings, stack)


def test_the_chapter_widget_logic_compares_with_the_default(stack):
    """prefetch.compare_with_default (the widget's logic): the same workload, side by side."""
    runs = run_lab06(stack, {"prefetch_multiplier": 1, "acks_late": True, "concurrency": 2})
    assert set(runs) == {"default", "yours"}
    assert runs["default"]["makespan ratio"] == 1.0
    for m in runs.values():
        assert len(m["attempts"]) == 13 and {a.state for a in m["attempts"]} == {"SUCCESS"}
        assert len(m["tasks per worker"]) == 2, "two workers shared each queue"
    assert prefetch.describe(runs["yours"]["setting"]) == "multiplier 1, acks_late, -c 2"
    assert not any(w.alive for m in runs.values() for w in m["workers"]), "workers stopped"


def test_lab06_reference_cannot_be_changed_from_a_notebook(stack):
    """A learner who edits "the defaults" in place gets a hint; the reference stays Celery's."""
    from celerylab import prefetch
    from celerylab.checks.lab06 import LAB06_DEFAULT

    def edits_the_defaults():
        settings = prefetch.DEFAULT
        settings["concurrency"] = 1
        return settings
    with pytest.raises(LabCheckFailed, match="worker_settings raised TypeError"):
        check_lab06(edits_the_defaults, stack)
    assert dict(LAB06_DEFAULT) == {"prefetch_multiplier": 4, "acks_late": False,
                                   "disable_prefetch": False, "concurrency": 2}
