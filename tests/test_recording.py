"""Grouping recorded events into attempts (pure logic, on a real Redis list)."""

import json

import pytest

from celerylab.recording import EVENTS, attempts, percentile


def push(stack, *events):
    for t, (event, tid, extra) in enumerate(events):
        stack.redis.rpush(EVENTS, json.dumps({"event": event, "id": tid, "t": float(t),
                                              "pid": 1, "host": "h", **extra}))


def test_redelivery_and_retry_open_new_attempts(stack):
    push(stack,
         ("sent", "a", {"name": "t", "queue": "q"}), ("received", "a", {}), ("started", "a", {}),
         ("received", "a", {"redelivered": True}), ("started", "a", {}),
         ("finished", "a", {"state": "FAILURE"}),
         ("sent", "a", {"retries": 1}), ("received", "a", {}), ("started", "a", {"retries": 1}),
         ("finished", "a", {"state": "SUCCESS"}))
    got = attempts(stack.redis)
    assert [(a.state, a.redelivered, a.retries) for a in got] == [
        (None, False, 0), ("FAILURE", True, 0), ("SUCCESS", False, 1)]
    assert got[0].queue == "q" and got[0].wait == 2.0


def test_percentile():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 95) == 5
    with pytest.raises(ValueError):
        percentile([], 50)


def test_a_retry_sent_before_its_attempt_finishes(stack):
    """The worker publishes the retry (sent) before the failing attempt's postrun (finished)."""
    push(stack,
         ("sent", "b", {}), ("received", "b", {}), ("started", "b", {}),
         ("sent", "b", {"retries": 1}), ("finished", "b", {"state": "RETRY"}),
         ("received", "b", {}), ("started", "b", {"retries": 1}),
         ("finished", "b", {"state": "SUCCESS"}))
    got = attempts(stack.redis)
    assert [(a.sent, a.received, a.started, a.finished, a.state) for a in got] == [
        (0.0, 1.0, 2.0, 4.0, "RETRY"), (3.0, 5.0, 6.0, 7.0, "SUCCESS")]


def test_two_copies_running_at_once_each_keep_their_own_finish(stack):
    """A redelivery past the visibility timeout starts while the first copy still runs: the first
    copy's finished event belongs to the process that started it, not to the latest attempt."""
    push(stack,
         ("sent", "c", {}), ("received", "c", {}), ("started", "c", {"pid": 11}),
         ("received", "c", {"redelivered": True}), ("started", "c", {"pid": 12}),
         ("finished", "c", {"pid": 11, "state": "SUCCESS"}),
         ("finished", "c", {"pid": 12, "state": "SUCCESS"}))
    got = attempts(stack.redis)
    assert [(a.pid, a.started, a.finished, a.redelivered) for a in got] == [
        (11, 2.0, 5.0, False), (12, 4.0, 6.0, True)]


def test_a_killed_child_is_recorded_lost_and_the_retry_still_finishes(stack):
    """The worker's main process reports a WorkerLostError (`lost`); nothing finished it."""
    push(stack,
         ("sent", "d", {}), ("received", "d", {}), ("started", "d", {"pid": 21}),
         ("lost", "d", {"pid": 20}),
         ("sent", "d", {"retries": 1}), ("received", "d", {}),
         ("started", "d", {"pid": 22, "retries": 1}),
         ("finished", "d", {"pid": 22, "state": "SUCCESS"}))
    got = attempts(stack.redis)
    assert [(a.pid, a.state, a.finished) for a in got] == [(21, "LOST", None), (22, "SUCCESS", 7.0)]
