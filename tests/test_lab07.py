"""Lab 7 (lag sampler and alert): the checker accepts right answers and rejects wrong ones,
with a busy-loop process running beside it.

Sampler variants are judged before any worker starts; alert variants run the live check (three
queues, a burst, a worker frozen with SIGSTOP and a second one added: about 20 s each)."""

from __future__ import annotations

import json
import time

import pytest
from conftest import solution_function

from celerylab.checks import LabCheckFailed, MachineTooBusy, check_lab07

pytestmark = pytest.mark.usefixtures("hog")

LAB = "lab07_lag_alert"
SAMPLER = solution_function(LAB, "sample_queue")
ALERT = solution_function(LAB, "lag_alert")
SUB = "\x06\x16"


def run_check(sampler, alert, stack, tries: int = 2) -> None:
    """check_lab07, tried again when the checker's own reference says the machine is too busy
    (never a verdict on the answer)."""
    for attempt in range(tries):
        try:
            return check_lab07(sampler, alert, stack)
        except MachineTooBusy:
            if attempt == tries - 1:
                pytest.skip("the machine was too busy to judge, twice in a row")


# --- right answers ---------------------------------------------------------------------------
def sampler_lrange(r, queue):
    """Unusual but right: reads every message of every list (heavier), keys by step."""
    depth, stamps = 0, []
    for name in [queue, *(f"{queue}{SUB}{s}" for s in (3, 6, 9))]:
        items = r.lrange(name, 0, -1)
        depth += len(items)
        stamps += [json.loads(x)["headers"]["celerylab_sent_at"] for x in items]
    return {"depth": depth, "oldest_age": (time.time() - min(stamps)) if stamps else None}


def alert_median_of_three(history):
    """Unusual but right: the median age of the last three readings above 2.5 s."""
    ages = sorted((h["oldest_age"] or 0.0) for h in history[-3:])
    return len(ages) == 3 and ages[1] > 2.5


def test_lab07_accepts_the_solution(stack, capsys):
    run_check(SAMPLER, ALERT, stack)
    assert "Lab 7 passed" in capsys.readouterr().out


def test_lab07_accepts_an_unusual_right_answer(stack, capsys):
    run_check(sampler_lrange, alert_median_of_three, stack)
    assert "Lab 7 passed" in capsys.readouterr().out


# --- wrong samplers (judged before any worker starts) --------------------------------------
def sampler_bare_list(r, queue):
    oldest = r.lindex(queue, -1)
    age = time.time() - json.loads(oldest)["headers"]["celerylab_sent_at"] if oldest else None
    return {"depth": r.llen(queue), "oldest_age": age}


def sampler_newest(r, queue):
    depth, stamps = 0, []
    for name in [queue, *(f"{queue}{SUB}{s}" for s in (3, 6, 9))]:
        depth += r.llen(name)
        newest = r.lindex(name, 0)
        if newest:
            stamps.append(json.loads(newest)["headers"]["celerylab_sent_at"])
    return {"depth": depth, "oldest_age": time.time() - max(stamps) if stamps else None}


def sampler_milliseconds(r, queue):
    got = SAMPLER(r, queue)
    return {**got, "oldest_age": got["oldest_age"] * 1000 if got["oldest_age"] else None}


def sampler_pop_and_push_back(r, queue):
    got = {"depth": 0, "oldest_age": None}
    for name in [queue, *(f"{queue}{SUB}{s}" for s in (3, 6, 9))]:
        raw = r.rpop(name)
        if raw is not None:
            r.rpush(name, raw)
    return SAMPLER(r, queue) if got else got


def sampler_age_zero_when_empty(r, queue):
    got = SAMPLER(r, queue)
    return {**got, "oldest_age": got["oldest_age"] or 0.0}


def sampler_stub(r, queue):
    raise NotImplementedError


@pytest.mark.parametrize("sampler, hint", [
    (sampler_stub, "sample_queue is not written yet"),
    (sampler_bare_list, r"depth of 3 for a queue holding 6 messages .*Count every list"),
    (sampler_newest, "Which end of a list is the oldest"),
    (sampler_milliseconds, "which unit is the age in"),
    (sampler_pop_and_push_back, "sample_queue changed Redis"),
    (sampler_age_zero_when_empty, "For an empty queue"),
], ids=["stub", "bare-list-only", "newest-end", "milliseconds", "pop-and-push-back",
        "zero-age-when-empty"])
def test_lab07_rejects_wrong_samplers_fast(stack, sampler, hint):
    t0 = time.monotonic()
    with pytest.raises(LabCheckFailed, match=hint):
        run_check(sampler, ALERT, stack)
    assert time.monotonic() - t0 < 5 and not stack._workers, "judged before any worker starts"


# --- wrong alerts (judged live) ----------------------------------------------------------------
def alert_on_depth(history):
    return history[-1]["depth"] > 20


def alert_latching(history):
    return any((h["oldest_age"] or 0) > 3 for h in history)


def alert_too_lenient(history):
    return (history[-1]["oldest_age"] or 0) > 8


def alert_twitchy(history):
    """No waiting period, and a threshold a burst reaches."""
    return (history[-1]["oldest_age"] or 0) > 0.3


def alert_returns_none(history):
    if (history[-1]["oldest_age"] or 0) > 3:
        return True


@pytest.mark.parametrize("alert, hint", [
    (alert_on_depth, r"fired for lab07-burst .*depth had reached"),
    (alert_latching, "still firing for lab07-stall .* after the queue had drained"),
    (alert_too_lenient, "never fired for lab07-stall"),
    (alert_twitchy, "fired for lab07-(steady|burst)"),
    (alert_returns_none, r"lag_alert returned None"),
], ids=["depth-threshold", "never-clears", "threshold-too-high", "no-waiting-period",
        "returns-none"])
def test_lab07_rejects_wrong_alerts(stack, alert, hint):
    with pytest.raises(LabCheckFailed, match=hint):
        run_check(SAMPLER, alert, stack)
