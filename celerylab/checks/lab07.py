"""Lab 7 checker: ``sample_queue(r, queue)`` reads a queue's depth and lag; ``lag_alert(history)``
decides when to page.

1. The sampler, on a queue of known contents and no worker: an empty queue reads depth 0 and no
   age; a queue whose oldest message sits in a priority sub-list reads the depth of all its lists
   and that message's age; the sampler only reads (a client that records every command; Redis's
   change counter).
2. The alert, live: three queues take a steady load on real workers; one gets a burst that its
   worker drains, one has its worker frozen (SIGSTOP) until a second worker is added. The learner's
   sampler and alert run every 0.25 s on each queue. The alert must stay quiet for the steady queue
   and the draining burst, fire for the stall within ``FIRE_WITHIN`` seconds of the freeze, and
   clear within ``CLEAR_WITHIN`` seconds once the stalled queue has drained. The truth (depth and
   age read by ``celerylab.observe``) is recorded beside every reading, for the hints.

Timing is judged against what happened in the same run: when the burst's own oldest message (the
truth) waited longer than ``BURST_GRACE`` because the machine is slow, the burst verdict is not
given (``MachineTooBusy``).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

from celerylab import observe
from celerylab.checks.common import LabCheckFailed, MachineTooBusy, call_learner, checker, ok
from celerylab.checks.lab01 import _command_flags, _dirty, _RecordingRedis, _writes

TASK = "celerylab.workloads.wait_io"
PROBE = "lab07-probe"
STEADY, BURST, STALL = "lab07-steady", "lab07-burst", "lab07-stall"
TICK = 0.25  # s between readings
LOAD_SECONDS, FREEZE_AT, RESCUE_AT = 11.0, 1.0, 8.0
BURST_SIZE = 60
BURST_GRACE = 2.0  # s: the burst's oldest message never waits longer on a machine that keeps up
FIRE_WITHIN = 6.0  # s after the freeze
CLEAR_WITHIN = 2.0  # s after the stalled queue drained
QUIET_AFTER = 2.5  # s of readings kept after the stalled queue drained


def _validate_reading(got, what: str) -> dict:
    if not isinstance(got, dict) or not {"depth", "oldest_age"} <= set(got):
        raise LabCheckFailed(f"sample_queue returned {got!r:.100} for {what}; the lab asks for a "
                             'dict with "depth" and "oldest_age".')
    depth, age = got["depth"], got["oldest_age"]
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise LabCheckFailed(f'sample_queue\'s "depth" is {depth!r:.60} ({type(depth).__name__}) '
                             f"for {what}: it should be a whole number of messages (an int).")
    if age is not None and (isinstance(age, bool) or not isinstance(age, (int, float))):
        raise LabCheckFailed(f'sample_queue\'s "oldest_age" is {age!r:.60} for {what}: it should '
                             "be a number of seconds, or None when nothing waits.")
    return got


def _read_watched(sample_queue, stack, queue: str, flags) -> tuple[dict, float, float, float]:
    """One learner reading with a recording client: (reading, true depth, true age low, high)."""
    r = stack.redis
    spy = _RecordingRedis.from_url(stack.url, socket_timeout=10)
    try:
        before_depth, before_age = observe.depth(r, queue), observe.oldest_age(r, queue)
        dirty = _dirty(r)
        got = call_learner(sample_queue, spy, queue, what="sample_queue")
        changed = _dirty(r) - dirty
        after_age = observe.oldest_age(r, queue)
    finally:
        spy.close()
    writes = _writes(spy.sent, flags)
    if writes or changed:
        counts = ", ".join(f"{n} x{k}" for n, k in Counter(writes).items()) or \
            f"{changed} changes counted by Redis"
        raise LabCheckFailed(
            f"sample_queue changed Redis while it read {queue!r} ({counts}). A monitor runs all "
            "day beside the workers: it must only read (a message taken off and put back can "
            "be taken out of turn, or lost in between).")
    if observe.depth(r, queue) != before_depth:
        raise LabCheckFailed(f"The queue held {before_depth} messages before sample_queue read it "
                             f"and {observe.depth(r, queue)} after: a reading must not change it.")
    ages = [a for a in (before_age, after_age) if a is not None]
    low, high = (min(ages), max(ages)) if ages else (None, None)
    return _validate_reading(got, f"the queue {queue!r}"), before_depth, low, high


def _check_sampler(sample_queue, stack, flags) -> None:
    r = stack.redis
    got, _, _, _ = _read_watched(sample_queue, stack, PROBE, flags)
    if got["depth"] != 0 or got["oldest_age"] is not None:
        raise LabCheckFailed(f"For an empty queue sample_queue returned {got!r:.100}; nothing "
                             'waits there: depth 0 and oldest_age None.')
    # the oldest message waits in a priority sub-list; then plain ones and other priorities
    send = stack.control.send_task
    send(TASK, (0,), queue=PROBE, priority=6)
    time.sleep(0.6)
    for options in ({}, {}, {"priority": 9}, {"priority": 3}, {}):
        send(TASK, (0,), queue=PROBE, **options)
    lists = {name: r.llen(name) for name in observe.queue_lists(PROBE)}
    got, depth, low, high = _read_watched(sample_queue, stack, PROBE, flags)
    if got["depth"] != depth:
        where = ", ".join(f"{n} in {name.encode('unicode_escape').decode()!r}"
                          for name, n in lists.items() if n)
        raise LabCheckFailed(f"sample_queue read a depth of {got['depth']} for a queue holding "
                             f"{depth} messages ({where}). Count every list of the queue.")
    age = got["oldest_age"]
    if age is None or not (low - 0.05 <= age <= high + 0.05):
        raise LabCheckFailed(
            f"sample_queue read an oldest_age of {age!r:.40} for a queue whose oldest message had "
            f"waited {low:.2f} s: it was published first, with priority 6, so it waits in the "
            "sub-list ending in step 6, not in the bare list. Which end of a list is the oldest, "
            "and which unit is the age in?")
    r.delete(*observe.queue_lists(PROBE))
    ok(f"sample_queue reads depth {depth} across the priority sub-lists and the oldest age "
       f"({age:.2f} s), and only reads")


class _Live:
    """The live run: workers, load, and every reading of every queue."""

    def __init__(self, stack, sample_queue, lag_alert, flags) -> None:
        self.stack, self.sample_queue, self.lag_alert, self.flags = stack, sample_queue, \
            lag_alert, flags
        self.history = {q: [] for q in (STEADY, BURST, STALL)}  # learner's readings
        self.truth = {q: [] for q in (STEADY, BURST, STALL)}  # (t, depth, age)
        self.fired = {q: [] for q in (STEADY, BURST, STALL)}  # (t, bool)

    def read_all(self) -> None:
        r = self.stack.redis
        for q in self.history:
            t = time.time()
            depth, age = observe.depth(r, q), observe.oldest_age(r, q, t)
            got = _validate_reading(call_learner(self.sample_queue, self.spy, q,
                                                 what="sample_queue"), f"the queue {q!r}")
            self.history[q].append({"t": t, "depth": got["depth"], "oldest_age": got["oldest_age"]})
            self.truth[q].append((t, depth, age))
            verdict = call_learner(self.lag_alert, [dict(h) for h in self.history[q]],
                                   what="lag_alert")
            if not isinstance(verdict, bool):
                raise LabCheckFailed(f"lag_alert returned {verdict!r:.60} "
                                     f"({type(verdict).__name__}); it should return True (fire) "
                                     "or False.")
            self.fired[q].append((t, verdict))

    def run(self) -> dict:
        stack = self.stack
        make = stack.worker
        steady = make("celerylab.workloads", name="lab07-steady", queues=[STEADY], concurrency=2,
                      prefetch_multiplier=1)
        burst = make("celerylab.workloads", name="lab07-burst", queues=[BURST], concurrency=4,
                     prefetch_multiplier=1)
        stalled = make("celerylab.workloads", name="lab07-stall-a", queues=[STALL],
                       concurrency=2, prefetch_multiplier=1)
        rescuer = make("celerylab.workloads", name="lab07-stall-b", queues=[STALL],
                       concurrency=2, prefetch_multiplier=1)
        stack.start_workers(steady, burst, stalled)
        send = stack.control.send_task
        rates = {STEADY: 5, BURST: 5, STALL: 3}
        options = {STEADY: {}, BURST: {}, STALL: {"priority": 6}}  # the stall's wait in a sub-list
        self.spy = _RecordingRedis.from_url(stack.url, socket_timeout=10)
        frozen = False
        booting = None
        marks: dict[str, float] = {}
        try:
            t0 = time.time()
            sent = dict.fromkeys(rates, 0)
            next_read = t0
            drained_at = None
            while True:
                now = time.time()
                elapsed = now - t0
                for q, rate in rates.items():
                    while sent[q] < int(min(elapsed, LOAD_SECONDS) * rate) + 1:
                        send(TASK, (0.05,), queue=q, **options[q])
                        sent[q] += 1
                if "freeze" not in marks and elapsed >= FREEZE_AT:
                    for _ in range(BURST_SIZE):
                        send(TASK, (0.05,), queue=BURST)
                    os.killpg(stalled.pid, signal.SIGSTOP)
                    frozen = True
                    marks["freeze"] = time.time()
                if "rescue" not in marks and elapsed >= RESCUE_AT:
                    booting = threading.Thread(target=rescuer.start)
                    booting.start()
                    marks["rescue"] = time.time()
                if now >= next_read:
                    self.read_all()
                    next_read += TICK
                if elapsed > LOAD_SECONDS and drained_at is None and \
                        observe.depth(stack.redis, STALL) == 0:
                    drained_at = time.time()
                if drained_at and time.time() - drained_at > QUIET_AFTER:
                    break
                if elapsed > LOAD_SECONDS + 12:
                    raise LabCheckFailed("The stalled queue did not drain within 12 s of the "
                                         "load's end (the check's own workers): run it again.")
                time.sleep(0.02)
            marks["drained"] = drained_at
            self.writes = _writes(self.spy.sent, self.flags)
        finally:
            if frozen:
                os.killpg(stalled.pid, signal.SIGCONT)
            if booting:
                booting.join(timeout=30)
            self.spy.close()
            stack.stop_workers()
        return marks


def _fmt(t: float, t0: float) -> str:
    return f"+{t - t0:.1f} s"


def _judge(live: _Live, marks: dict) -> None:
    t_freeze, t_drained = marks["freeze"], marks["drained"]
    t0 = t_freeze - FREEZE_AT
    if live.writes:
        raise LabCheckFailed(f"sample_queue sent commands that change Redis during the live run "
                             f"({', '.join(sorted(set(live.writes)))}): a monitor must only read.")
    steady_truth = max(age or 0 for _, _, age in live.truth[STEADY])
    burst_truth = max(age or 0 for _, _, age in live.truth[BURST])
    if steady_truth > BURST_GRACE or burst_truth > BURST_GRACE + 1:
        raise MachineTooBusy(f"the check's own workers fell behind (a steady queue's oldest "
                             f"message waited {steady_truth:.1f} s, the burst's {burst_truth:.1f} "
                             "s), so quiet and loud queues cannot be told apart right now.")
    for q in (STEADY, BURST):
        firing = [t for t, f in live.fired[q] if f]
        if firing:
            t = firing[0]
            depth = max(d for tt, d, _ in live.truth[q] if tt <= t)
            age = max(a or 0 for tt, _, a in live.truth[q] if tt <= t)
            what = ("a queue that keeps up" if q == STEADY else
                    f"a burst of {BURST_SIZE} messages that its worker drained by itself")
            raise LabCheckFailed(
                f"Your alert fired for {q} at {_fmt(t, t0)}: {what}. Its depth had reached "
                f"{depth}, but its oldest message had waited at most {age:.1f} s. Nobody needs "
                "to be woken for that.")
    if burst_truth > BURST_GRACE:
        raise MachineTooBusy(f"the burst's oldest message waited {burst_truth:.1f} s (it drains "
                             f"within {BURST_GRACE:g} s on a machine that keeps up).")
    ok(f"quiet for the steady queue and for the burst (depth up to "
       f"{max(d for _, d, _ in live.truth[BURST])}, oldest age up to {burst_truth:.1f} s)")

    stall_age = max(a or 0 for _, _, a in live.truth[STALL])
    stall_depth = max(d for _, d, _ in live.truth[STALL])
    firing = [t for t, f in live.fired[STALL] if f and t >= t_freeze]
    if not firing:
        raise LabCheckFailed(
            f"Your alert never fired for {STALL}, whose worker was frozen from {_fmt(t_freeze, t0)}"
            f" to past {_fmt(marks['rescue'], t0)}: its oldest message waited up to "
            f"{stall_age:.1f} s (depth up to {stall_depth}). A queue nobody consumes is the "
            "incident to page for.")
    late = firing[0] - t_freeze
    if late > FIRE_WITHIN:
        raise LabCheckFailed(
            f"Your alert fired for {STALL} only {late:.1f} s after its worker froze; the lab asks "
            f"for at most {FIRE_WITHIN:g} s (by then its oldest message had waited "
            f"{max(a or 0 for t, _, a in live.truth[STALL] if t <= firing[0]):.1f} s).")
    ok(f"fired for the stall {late:.1f} s after its worker froze (oldest age then "
       f"{max(a or 0 for t, _, a in live.truth[STALL] if t <= firing[0]):.1f} s)")

    after = [(t, f) for t, f in live.fired[STALL] if t >= t_drained + CLEAR_WITHIN]
    still = [t for t, f in after if f]
    if still:
        raise LabCheckFailed(
            f"Your alert was still firing for {STALL} {still[-1] - t_drained:.1f} s after the "
            "queue had drained (depth 0, nothing waiting) once a second worker was added. An "
            "alert that does not clear hides the next incident.")
    cleared = next((t for t, f in live.fired[STALL] if t > firing[0] and not f), t_drained)
    ok(f"cleared after the recovery, {cleared - marks['rescue']:.1f} s after the second worker "
       "was asked for")


@checker
def check_lab07(sample_queue, lag_alert, stack) -> None:
    """Lab 7: a read-only lag sampler, and an alert that fires for a stall, not for a burst."""
    r = stack.redis
    stack.reset()
    flags = _command_flags(r)
    _check_sampler(sample_queue, stack, flags)
    live = _Live(stack, sample_queue, lag_alert, flags)
    marks = live.run()
    _judge(live, marks)
    print("Lab 7 passed: your sampler reads depth and lag without touching the queues, and your "
          "alert pages for a stalled queue, not for a burst, and clears after recovery.")
