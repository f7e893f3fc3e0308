"""Lab 7 (lag sampler and alert): the checker accepts right answers and rejects wrong ones,
with a busy-loop process beside the solution and the other answers judged side by side
(conftest.side_by_side; the soak: beside all of it).

Sampler variants are judged before any worker starts; alert variants run the live check (three
queues, a burst, a worker frozen with SIGSTOP and a second one added: about 20 s each)."""

from __future__ import annotations

import json
import time

import pytest
from conftest import assert_verdict, solution_function

from celerylab.checks import LabCheckFailed, MachineTooBusy, check_lab07
from celerylab.workers import Worker

pytestmark = pytest.mark.usefixtures("hog")

LAB = "lab07_lag_alert"
SAMPLER = solution_function(LAB, "sample_queue")
ALERT = solution_function(LAB, "lag_alert")
SUB = "\x06\x16"


def run_check(sampler, alert, stack, tries: int = 3) -> None:
    """check_lab07, tried again when the checker's own reference says the machine is too busy
    (never a verdict on the answer)."""
    for attempt in range(tries):
        try:
            return check_lab07(sampler, alert, stack)
        except MachineTooBusy as exc:
            if attempt == tries - 1:
                pytest.skip(f"the machine was too busy to judge, {tries} times in a row "
                            f"(last: {exc})")


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


def judge(stack, folder, sampler=None, alert=None, **_):
    """One answer's live check (conftest.judge_here): the solution's parts where not given."""
    check_lab07(sampler or SAMPLER, alert or ALERT, stack)


def test_lab07_accepts_the_solution(verdict):
    assert "Lab 7 passed" in assert_verdict(verdict, None)


def alert_hysteresis(history):
    """Unusual but right: on above 2.5 s for two readings, off below 0.5 s."""
    on = False
    for prev, h in zip([None, *history], history, strict=False):
        age, before = h["oldest_age"] or 0, (prev["oldest_age"] or 0) if prev else 0
        on = (age > 2.5 and before > 2.5) or (on and age >= 0.5)
    return on


@pytest.mark.parametrize("sampler, alert", [
    (sampler_lrange, alert_median_of_three),
    (None, alert_hysteresis),
], ids=["lrange-median-of-three", "hysteresis"])
def test_lab07_accepts_unusual_right_answers(verdict, sampler, alert):
    assert "Lab 7 passed" in assert_verdict(verdict, None)


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


def sampler_sub_lists_age_only(r, queue):
    """Depth right, but the age only from the priority sub-lists."""
    got = SAMPLER(r, queue)
    stamps = [json.loads(x)["headers"]["celerylab_sent_at"] for x in
              (r.lindex(f"{queue}{SUB}{s}", -1) for s in (3, 6, 9)) if x]
    return {**got, "oldest_age": time.time() - min(stamps) if stamps else None}


def sampler_scan_prefix(r, queue):
    """Finds the lists with SCAN MATCH queue*: also counts a neighbour queue."""
    names = [k.decode() for k in r.scan_iter(match=f"{queue}*")]
    depth = sum(r.llen(n) for n in names)
    got = SAMPLER(r, queue)
    return {**got, "depth": depth}


def sampler_capped_lrange(r, queue):
    """Reads at most 100 messages of each list."""
    depth, stamps = 0, []
    for name in [queue, *(f"{queue}{SUB}{s}" for s in (3, 6, 9))]:
        items = r.lrange(name, 0, 99)
        depth += len(items)
        stamps += [json.loads(x)["headers"]["celerylab_sent_at"] for x in items]
    return {"depth": depth, "oldest_age": (time.time() - min(stamps)) if stamps else None}


def sampler_lua_that_writes(r, queue):
    """Reads through a script, which also leaves a note in Redis."""
    r.eval("redis.call('set', 'lab07:last-read', ARGV[1]) return 1", 0, queue)
    return SAMPLER(r, queue)


def sampler_waits_for_work(r, queue):
    while r.llen(queue) == 0:
        time.sleep(0.05)
    return SAMPLER(r, queue)


@pytest.mark.parametrize("sampler, hint", [
    (sampler_stub, "sample_queue is not written yet"),
    (sampler_bare_list, r"read a depth of \d+ for a queue holding \d+ messages .*Count every list"),
    (sampler_newest, "younger than the oldest message: which end"),
    (sampler_milliseconds, "thousand times too large: which unit"),
    (sampler_pop_and_push_back, "sample_queue tried to change Redis"),
    (sampler_age_zero_when_empty, "For an empty queue"),
    (sampler_sub_lists_age_only, r"lab07-probe-b.*the bare list, behind 120"),
    (sampler_scan_prefix, "and nothing else"),
    (sampler_capped_lrange, r"read a depth of 102 for a queue holding 123"),
    (sampler_lua_that_writes, "sample_queue tried to change Redis"),
    (sampler_waits_for_work, "did not return within 2 s"),
], ids=["stub", "bare-list-only", "newest-end", "milliseconds", "pop-and-push-back",
        "zero-age-when-empty", "age-from-sub-lists-only", "scan-prefix", "lrange-capped",
        "script-that-writes", "waits-for-work"])
def test_lab07_rejects_wrong_samplers_fast(stack, sampler, hint, monkeypatch):
    started = []
    # every worker start goes through Worker.start (stack.start_workers too): record, start none
    monkeypatch.setattr(Worker, "start", lambda self, *a, **k: started.append(self) or self)
    with pytest.raises(LabCheckFailed, match=hint):
        run_check(sampler, ALERT, stack)
    assert not started, "judged before any worker starts"


# --- wrong alerts (judged live) ----------------------------------------------------------------
def alert_on_depth(history):
    return history[-1]["depth"] > 20


def alert_latching(history):
    """Turns on like the solution (over 3 s for 1 s), then never clears."""
    since = None
    for h in history:
        if (h["oldest_age"] or 0) > 3:
            since = since or h["t"]
            if h["t"] - since >= 1.0:
                return True
        else:
            since = None
    return False


def alert_too_lenient(history):
    return (history[-1]["oldest_age"] or 0) > 8


def alert_twitchy(history):
    """No waiting period, and a threshold a burst reaches."""
    return (history[-1]["oldest_age"] or 0) > 0.3


def alert_returns_none(history):
    if (history[-1]["oldest_age"] or 0) > 3:
        return True


def alert_depth_held(history):
    """Depth over 15 for 2.25 s: quiet for the burst, which drains sooner (seen passing the
    live run twice)."""
    since = None
    for h in history:
        since = (since or h["t"]) if h["depth"] > 15 else None
    return since is not None and history[-1]["t"] - since >= 2.25


def alert_age_no_hold(history):
    """Over 1.1 s, no waiting period: quiet while a burst stays under it on this machine."""
    return (history[-1]["oldest_age"] or 0) > 1.1


def alert_single_reading_low(history):
    return (history[-1]["oldest_age"] or 0) > 0.7


def alert_edge_triggered(history):
    """True only on the reading where the age crosses the threshold."""
    return len(history) >= 2 and (history[-1]["oldest_age"] or 0) > 3 >= \
        (history[-2]["oldest_age"] or 0)


def alert_slow_to_clear(history):
    """Stays on until the age has been low for 4 s (the lab asks for 2 s after the drain); turns
    on like the solution (over 3 s for 1 s), so that is its only fault."""
    on, quiet_since, above_since = False, None, None
    for h in history:
        high = (h["oldest_age"] or 0) > 3
        above_since = (above_since or h["t"]) if high else None
        if high and (on or h["t"] - above_since >= 1.0):
            on, quiet_since = True, None
        elif on:
            quiet_since = quiet_since or h["t"]
            if h["t"] - quiet_since >= 4.0:
                on = False
    return on


def sampler_with_in_flight(r, queue):
    """Counts what workers hold, too (HLEN unacked): not waiting."""
    got = SAMPLER(r, queue)
    return {**got, "depth": got["depth"] + r.hlen("unacked")}


def sampler_slow(r, queue):
    time.sleep(0.6)
    return SAMPLER(r, queue)


@pytest.mark.parametrize("sampler, alert, hint", [
    (sampler_with_in_flight, None, "also counted the 3 messages a consumer holds"),
    (sampler_slow, alert_on_depth, r"A reading of sample_queue took \d+\.\d\d s \(median\)"),
], ids=["counts-in-flight", "too-slow-for-a-burst"])
def test_lab07_rejects_live_samplers(verdict, sampler, alert, hint):
    assert_verdict(verdict, hint)


@pytest.mark.parametrize("alert, hint", [
    (alert_single_reading_low, r"fires for an ordinary burst|fired for lab07-(burst|steady)"),
    (alert_edge_triggered, "went quiet .* while the queue was still stalled"),
    (alert_slow_to_clear, "still firing for lab07-stall"),
    (alert_on_depth, r"fired for lab07-burst .*depth had reached"),
    (alert_latching, "still firing for lab07-stall .* after the queue had drained"),
    (alert_too_lenient, "never fired for lab07-stall|fired for lab07-stall only"),
    (alert_twitchy, "fires for an ordinary burst|fired for lab07-(steady|burst)"),
    (alert_returns_none, r"lag_alert returned None"),
    # live, depth may page late for the stall, or not at all; replayed, it pages for a busy
    # healthy queue: each is the same fault showing
    (alert_depth_held, r"fired for lab07-burst .*depth|busy but healthy queue|"
                       r"fired for lab07-stall only|never fired for lab07-stall"),
    (alert_age_no_hold, r"fires for an ordinary burst|fired for lab07-(burst|steady)"),
], ids=["low-threshold-no-wait", "edge-triggered", "slow-to-clear", "depth-threshold",
        "never-clears", "threshold-too-high", "no-waiting-period", "returns-none",
        "depth-held", "age-1.1-no-hold"])
def test_lab07_rejects_wrong_alerts(verdict, alert, hint):
    assert_verdict(verdict, hint)


@pytest.mark.parametrize("fired, expected", [
    ([0, 0, 1, 1, 1], MachineTooBusy),  # turned on when the burst was 3.2 s old: load, no verdict
    ([0, 1, 1, 1, 0], LabCheckFailed),  # turned on when it was 1.5 s old: the alert's own fault
], ids=["on-at-an-old-reading", "on-at-a-young-reading"])
def test_lab07_judges_a_burst_firing_by_the_age_that_turned_it_on(fired, expected):
    """An alert still on from a reading the load made old is not blamed for later young ones."""
    from types import SimpleNamespace

    from celerylab.checks import lab07

    ages = {lab07.STEADY: [0.2] * 5, lab07.BURST: [0.5, 1.5, 3.2, 1.0, 0.5], lab07.STALL: [0] * 5}
    live = SimpleNamespace(writes=[], took=[0.005] * 15, history={}, truth={}, fired={})
    for q, qa in ages.items():
        live.truth[q] = [(t, 70, 70, a, a) for t, a in enumerate(qa)]
        live.history[q] = [{"t": t, "depth": 70, "oldest_age": a} for t, a in enumerate(qa)]
        live.fired[q] = [(t, bool(f and q == lab07.BURST)) for t, f in enumerate(fired)]
    with pytest.raises(expected, match="fell behind" if expected is MachineTooBusy else
                       "fired for lab07-burst"):
        lab07._judge(live, {"freeze": 10.0})
