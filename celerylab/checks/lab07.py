"""Lab 7 checker: ``sample_queue(r, queue)`` reads a queue's depth and lag; ``lag_alert(history)``
decides when to page.

1. The sampler, on queues of known contents and no worker: an empty queue reads depth 0 and no
   age; a queue whose oldest message waits in a priority sub-list, and one whose oldest waits in
   the bare list behind a backlog of 120, next to a neighbour queue whose name starts the same
   and three of whose messages a consumer holds unacknowledged (kombu's ``unacked`` hash),
   read the depth of all their lists and the oldest message's age. The learner's client is a
   read-only Redis user (ACL: scripts included) that also records every command.
2. The alert, live: three queues take a steady load on real workers; one gets a burst that its
   worker drains (published while that worker pauses, so it arrives at once), one has its worker frozen (SIGSTOP) until a second worker is added. The learner's
   sampler and alert run every 0.25 s on each queue; the truth (``celerylab.observe``) is read
   before and after every reading. The readings must match the truth (and take well under the
   tick); the alert must stay quiet for the steady queue and the burst, fire for the stall within
   ``FIRE_WITHIN`` seconds of the freeze and stay on while it lasts, and be off from
   ``CLEAR_WITHIN`` seconds after the stalled queue has drained.

3. The alert, replayed (after the live verdicts): an ordinary burst recorded from a real run, its
   oldest reaching 1.5-2 s (quiet), a busy healthy queue of 25 waiting, none older than 0.1 s
   (quiet: depth is not lag), and a low-rate queue nobody consumes, 1-6 waiting and its oldest
   growing to 60 s (fire by 10 s, and stay on). The live run cannot make these on every machine.

Timing is judged against what happened in the same run: when the alert fired for the steady queue
or the burst, turning on while their own oldest message (the truth) waited longer than
``BURST_GRACE`` because the machine is slow, no verdict is given (``MachineTooBusy``); an alert
that stayed quiet is judged on the rest.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter

import redis

from celerylab import observe
from celerylab.checks.common import LabCheckFailed, MachineTooBusy, call_learner, checker, ok
from celerylab.checks.lab01 import _command_flags, _dirty, _RecordingRedis, _writes

TASK = "celerylab.workloads.wait_io"
PROBES = ("lab07-probe-a", "lab07-probe-b")
NEIGHBOUR = "lab07-probe-b-eu"  # another queue whose name starts with a probe's
STEADY, BURST, STALL = "lab07-steady", "lab07-burst", "lab07-stall"
TICK = 0.25  # s between readings
BURST_FILE = observe.RULES_FILE.parent / "burst-trace.json"
SLOW_READING = 0.15  # s: a reading slower than this (median) cannot keep the tick
LOAD_SECONDS, FREEZE_AT, RESCUE_AT = 11.0, 1.0, 8.0
BURST_SIZE = 80  # drained by 4 children of 50 ms tasks in ~1 s: its oldest waits about 1 s
BURST_GRACE = 2.0  # s: the burst's oldest message never waits longer on a machine that keeps up
FIRE_WITHIN = 6.0  # s after the freeze
CLEAR_WITHIN = 2.0  # s after the stalled queue drained
QUIET_AFTER = 2.5  # s of readings kept after that
READER = "celerylab-lab07-reader"  # a read-only Redis user for the learner's client


class _TooSlow(BaseException):  # not an Exception: call_learner must not turn it into a hint
    pass


def _timed(fn, *args, what: str, limit: float):
    """call_learner with a time limit (SIGALRM, in the main thread): a hang becomes a hint."""
    if threading.current_thread() is not threading.main_thread():
        return call_learner(fn, *args, what=what)

    def alarm(*_):
        raise _TooSlow

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        return call_learner(fn, *args, what=what)
    except _TooSlow:
        raise LabCheckFailed(f"{what} did not return within {limit:g} s (does it wait for "
                             "something, or block on Redis?). A monitor's reading must return "
                             "at once, whatever the queue holds.") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _reader(stack) -> _RecordingRedis:
    """The learner's client: records every command; on the course's own Redis it is also a
    read-only ACL user, so no command (nor a script's) can write."""
    url = stack.url
    if not stack.external:
        stack.redis.acl_setuser(READER, enabled=True, nopass=True, keys=["~*"], channels=["&*"],
                                commands=["+@read", "+@connection", "+@scripting",
                                          "+@transaction", "-@write", "-@dangerous", "+time",
                                          "+info"], reset=True)
        url = url.replace("redis://", f"redis://{READER}:x@", 1)
    return _RecordingRedis.from_url(url, socket_timeout=10)


def _writes_hint(queue: str, what: str) -> LabCheckFailed:
    return LabCheckFailed(
        f"sample_queue tried to change Redis while it read {queue!r} ({what}). A monitor runs all "
        "day beside the workers: it must only read (a message taken off and put back can be "
        "taken out of turn, or lost in between).")


def _sample(sample_queue, spy, queue: str, flags) -> dict:
    sent = len(spy.sent)
    try:
        got = _timed(sample_queue, spy, queue, what="sample_queue", limit=2.0)
    except LabCheckFailed as exc:
        text = str(exc)
        if "NoPermission" in text or "NOPERM" in text or "can't run this command" in text:
            raise _writes_hint(queue, "Redis refused a write") from None
        raise
    writes = _writes(spy.sent[sent:], flags)
    if writes:
        counts = ", ".join(f"{n} x{k}" for n, k in Counter(writes).items())
        raise _writes_hint(queue, counts)
    return _validate_reading(got, f"the queue {queue!r}")


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


def _age_hint(age, truth: float, where: str) -> str:
    if age is not None and truth > 0.2 and 500 < age / truth < 2000:
        return "It looks a thousand times too large: which unit is the age in?"
    if age is not None and age < truth - 0.3:
        return ("It is younger than the oldest message: which end of a list holds the oldest, "
                f"and did you look in every list? (Here the oldest waits in {where}.)")
    return "Which clock and which stamp did you use? The stamp is seconds since the epoch."


def _check_probe(sample_queue, stack, spy, flags, queue: str, where: str) -> None:
    r = stack.redis
    lists = {name: r.llen(name) for name in observe.queue_lists(queue)}
    depth, low = observe.depth(r, queue), observe.oldest_age(r, queue)
    dirty = _dirty(r)
    got = _sample(sample_queue, spy, queue, flags)
    high = observe.oldest_age(r, queue)
    if _dirty(r) != dirty:
        raise _writes_hint(queue, f"{_dirty(r) - dirty} changes counted by Redis")
    held = r.hlen("unacked")
    if held and got["depth"] == depth + held:
        raise LabCheckFailed(f"sample_queue read a depth of {got['depth']} for a queue holding "
                             f"{depth} waiting messages: it also counted the {held} messages a "
                             "consumer holds unacknowledged (kombu's 'unacked' hash, shared by "
                             "every queue). Those are not waiting: the lag is about what waits.")
    if got["depth"] != depth:
        shown = ", ".join(f"{n} in {name.encode('unicode_escape').decode()!r}"
                          for name, n in lists.items() if n)
        raise LabCheckFailed(f"sample_queue read a depth of {got['depth']} for a queue holding "
                             f"{depth} messages ({shown}). Count every list of this queue, and "
                             "nothing else.")
    age = got["oldest_age"]
    if age is None or not (low - 0.05 <= age <= high + 0.05):
        raise LabCheckFailed(f"sample_queue read an oldest_age of {age!r:.40} for {queue!r}, whose "
                             f"oldest message had waited {low:.2f} s. " + _age_hint(age, low, where))


def _check_sampler(sample_queue, stack, flags) -> None:
    r = stack.redis
    spy, holder = _reader(stack), None
    try:
        got = _sample(sample_queue, spy, PROBES[0], flags)
        if got["depth"] != 0 or got["oldest_age"] is not None:
            raise LabCheckFailed(f"For an empty queue sample_queue returned {got!r:.100}; nothing "
                                 'waits there: depth 0 and oldest_age None.')
        send = stack.control.send_task
        # probe a: its oldest message waits in a priority sub-list; probe b: in the bare list,
        # behind a backlog longer than 100; a neighbour queue shares probe b's name as a prefix
        send(TASK, (0,), queue=PROBES[0], priority=6)
        send(TASK, (0,), queue=PROBES[1])
        time.sleep(0.4)
        for options in ({}, {"priority": 6}, {"priority": 9}):
            send(TASK, (0,), queue=PROBES[0], **options)
        for options in ({"priority": 3}, {"priority": 6}):
            send(TASK, (0,), queue=PROBES[1], **options)
        for _ in range(5):
            send(TASK, (0,), queue=NEIGHBOUR)
        with stack.control.connection_for_write() as conn:
            for _ in range(120):
                send(TASK, (0,), queue=PROBES[1], connection=conn)
        # A consumer takes three of the neighbour's messages and holds them unacknowledged, as a
        # worker holds what it prefetched: kombu keeps them in the 'unacked' hash, not waiting.
        holder = stack.control.connection_for_read()
        for _ in range(3):
            holder.default_channel.basic_get(NEIGHBOUR, no_ack=False)
        _check_probe(sample_queue, stack, spy, flags, PROBES[0],
                     "a priority sub-list, published first")
        _check_probe(sample_queue, stack, spy, flags, PROBES[1],
                     "the bare list, behind 120 newer messages")
    finally:
        spy.close()
        if holder is not None:
            holder.release()  # kombu puts the held messages back in their queue
        r.delete(*observe.queue_lists(PROBES[0]), *observe.queue_lists(PROBES[1]),
                 *observe.queue_lists(NEIGHBOUR))
    ok("sample_queue reads depth across every list of a queue (and no other queue's) and the "
       "oldest message's age, wherever it waits, and only reads")


class _Live:
    """The live run: workers, load, and every reading of every queue."""

    def __init__(self, stack, sample_queue, lag_alert, flags) -> None:
        self.stack, self.sample_queue, self.lag_alert, self.flags = stack, sample_queue, \
            lag_alert, flags
        self.history = {q: [] for q in (STEADY, BURST, STALL)}  # the learner's readings
        # truth around each reading: (t, depth before, depth after, age before, age after)
        self.truth = {q: [] for q in (STEADY, BURST, STALL)}
        self.fired = {q: [] for q in (STEADY, BURST, STALL)}  # (t, bool)
        self.took: list[float] = []

    def read_all(self) -> None:
        r = self.stack.redis
        for q in self.history:
            t = time.time()
            depth0, age0 = observe.depth(r, q), observe.oldest_age(r, q, t)
            got = _sample(self.sample_queue, self.spy, q, self.flags)
            t1 = time.time()
            self.took.append(t1 - t)
            depth1, age1 = observe.depth(r, q), observe.oldest_age(r, q)
            self.history[q].append({"t": t, "depth": got["depth"],
                                    "oldest_age": got["oldest_age"]})
            self.truth[q].append((t, depth0, depth1, age0, age1))
            verdict = _timed(self.lag_alert, [dict(h) for h in self.history[q]],
                             what="lag_alert", limit=2.0)
            if not isinstance(verdict, bool):
                kind = f"{type(verdict).__module__}.{type(verdict).__name__}".replace(
                    "builtins.", "")
                raise LabCheckFailed(f"lag_alert returned {verdict!r:.60} ({kind}); it should "
                                     "return True (fire) or False, Python's own bool.")
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
        self.spy = _reader(stack)
        frozen = paused = False
        booting = None
        marks: dict[str, float] = {}
        try:
            t0 = time.time()
            sent = dict.fromkeys(rates, 0)
            next_read = t0
            while True:
                now = time.time()
                elapsed = now - t0
                for q, rate in rates.items():
                    while sent[q] < int(min(elapsed, LOAD_SECONDS) * rate) + 1:
                        send(TASK, (0.05,), queue=q, **options[q])
                        sent[q] += 1
                if "freeze" not in marks and elapsed >= FREEZE_AT:
                    # The burst arrives all at once: its worker pauses while it is published
                    # (on a busy machine publishing 80 can be slower than consuming them).
                    os.killpg(burst.pid, signal.SIGSTOP)
                    paused = True
                    with stack.control.connection_for_write() as conn:
                        for _ in range(BURST_SIZE):
                            send(TASK, (0.05,), queue=BURST, connection=conn)
                    os.killpg(burst.pid, signal.SIGCONT)
                    paused = False
                    # then the freeze (the stall queue got nothing while the burst was sent: its
                    # clock starts here), and the rescue counts from it, however long that took
                    os.killpg(stalled.pid, signal.SIGSTOP)
                    frozen = True
                    marks["freeze"] = time.time()
                    next_read = marks["freeze"]  # a reading right after the burst arrived
                if "rescue" not in marks and "freeze" in marks and \
                        time.time() >= marks["freeze"] + RESCUE_AT - FREEZE_AT:
                    booting = threading.Thread(target=rescuer.start)
                    booting.start()
                    marks["rescue"] = time.time()
                if time.time() >= next_read:
                    self.read_all()
                    next_read += TICK
                if "rescue" in marks and "drained" not in marks:
                    after = [x for x in self.truth[STALL] if x[0] > marks["rescue"]]
                    if after and after[-1][2] == 0:
                        marks["drained"] = after[-1][0]
                if elapsed > LOAD_SECONDS and "drained" in marks and \
                        time.time() - marks["drained"] > CLEAR_WITHIN + QUIET_AFTER:
                    break
                if elapsed > LOAD_SECONDS + 12:
                    raise MachineTooBusy("the stalled queue did not drain within 12 s of the "
                                         "load's end (the check's own workers).")
                time.sleep(0.02)
            self.writes = _writes(self.spy.sent, self.flags)
        finally:
            if paused:
                os.killpg(burst.pid, signal.SIGCONT)
            if frozen:
                os.killpg(stalled.pid, signal.SIGCONT)
            if booting:
                booting.join(timeout=30)
            self.spy.close()
            stack.stop_workers()
        return marks


def _fmt(t: float, t0: float) -> str:
    return f"{'+' if t >= t0 else '-'}{abs(t - t0):.1f} s"


def _judge_reading_speed(live: _Live) -> None:
    """Judged before anything else of the live run: a few Redis commands take milliseconds even
    on a busy machine (SLOW_READING is ~50x that), and a slow sampler slows the whole run."""
    took = sorted(live.took)[len(live.took) // 2]
    if took > SLOW_READING:
        raise LabCheckFailed(f"A reading of sample_queue took {took:.2f} s (median); the check "
                             f"reads each queue every {TICK:g} s, and a monitor that slow misses a "
                             "burst that comes and goes between its readings. A reading is a few "
                             "Redis commands: it should take milliseconds.")


def _judge_readings(live: _Live, t0: float) -> None:
    """The learner's readings against the truth read just before and after each of them."""
    for q in live.history:
        wrong = []
        for h, (t, d0, d1, a0, a1) in zip(live.history[q], live.truth[q], strict=True):
            depth_ok = min(d0, d1) - 1 <= h["depth"] <= max(d0, d1) + 1
            ages = [a for a in (a0, a1) if a is not None]
            if not ages:
                age_ok = h["oldest_age"] is None or h["oldest_age"] < 0.3
            else:
                age_ok = h["oldest_age"] is not None and \
                    min(ages) - 0.15 <= h["oldest_age"] <= max(ages) + 0.15
            if not (depth_ok and age_ok):
                wrong.append((t, h, d0, a0))
        if len(wrong) > max(2, len(live.history[q]) // 10):
            t, h, d0, a0 = max(wrong, key=lambda w: w[3] or 0)
            raise LabCheckFailed(
                f"Under load your sampler's readings of {q} differ from the queue: "
                f"{len(wrong)} of {len(live.history[q])} readings; at {_fmt(t, t0)} it read depth "
                f"{h['depth']} and oldest_age {h['oldest_age']!r:.6} while {d0} messages waited, "
                f"the oldest for {a0 or 0:.2f} s. (Its messages carry priority 6 here; workers "
                "also hold some unacknowledged, which are not waiting.)")


def _judge(live: _Live, marks: dict) -> None:
    t_freeze = marks["freeze"]
    t0 = t_freeze - FREEZE_AT
    if live.writes:
        raise _writes_hint("the live queues", ", ".join(sorted(set(live.writes))))
    _judge_reading_speed(live)
    steady_truth = max(max(x[3] or 0, x[4] or 0) for x in live.truth[STEADY])
    burst_truth = max(max(x[3] or 0, x[4] or 0) for x in live.truth[BURST])
    burst_depth = max(x[1] for x in live.truth[BURST])
    loud = any(f for q in (STEADY, BURST) for _, f in live.fired[q])
    # the alert turning on at a reading where that queue's oldest message (the truth) had waited
    # at most BURST_GRACE: a verdict whatever the load did elsewhere in the run. Only the onset
    # counts: an alert still on from an older reading is judged by the age that turned it on.
    young = {q: [t for i, ((t, f), x) in enumerate(zip(live.fired[q], live.truth[q], strict=True))
                 if f and not (i and live.fired[q][i - 1][1])
                 and max(x[3] or 0, x[4] or 0) <= BURST_GRACE] for q in (STEADY, BURST)}
    if loud and not any(young.values()) and \
            (steady_truth > BURST_GRACE or burst_truth > BURST_GRACE):
        raise MachineTooBusy(f"the check's own workers fell behind (a steady queue's oldest "
                             f"message waited {steady_truth:.1f} s, the burst's {burst_truth:.1f} "
                             f"s; on a machine that keeps up they wait under {BURST_GRACE:g} s), "
                             "so whether your alert was right to fire for them cannot be told "
                             "right now.")
    if burst_depth < BURST_SIZE // 2:
        raise MachineTooBusy(f"the check's first reading after the burst saw only {burst_depth} "
                             f"of its {BURST_SIZE} messages waiting.")
    _judge_readings(live, t0)
    ok(f"the sampler's readings match the queues under load ({len(live.took)} readings, median "
       f"{sorted(live.took)[len(live.took) // 2] * 1000:.0f} ms each)")
    for q in (STEADY, BURST):
        firing = young[q] or [t for t, f in live.fired[q] if f]
        if firing:
            t = firing[0]
            depth = max(x[1] for x in live.truth[q] if x[0] <= t)
            age = max(max(x[3] or 0, x[4] or 0) for x in live.truth[q] if x[0] <= t)
            what = ("a queue that keeps up" if q == STEADY else
                    f"a burst of {BURST_SIZE} messages that its worker drained by itself")
            raise LabCheckFailed(
                f"Your alert fired for {q} at {_fmt(t, t0)}: {what}. Its depth had reached "
                f"{depth}, but its oldest message had waited at most {age:.1f} s. Nobody needs "
                "to be woken for that.")
    ok(f"quiet for the steady queue and for the burst (depth up to {burst_depth}, oldest age up "
       f"to {burst_truth:.1f} s)")

    stall_age = max(max(x[3] or 0, x[4] or 0) for x in live.truth[STALL])
    stall_depth = max(x[1] for x in live.truth[STALL])
    firing = [t for t, f in live.fired[STALL] if f and t >= t_freeze]
    if not firing:
        raise LabCheckFailed(
            f"Your alert never fired for {STALL}, whose worker was frozen from {_fmt(t_freeze, t0)}"
            f" to past {_fmt(marks['rescue'], t0)}: its oldest message waited up to "
            f"{stall_age:.1f} s (depth up to {stall_depth}). A queue nobody consumes is the "
            "incident to page for. (lag_alert is called in turn for three queues, each time with "
            "that queue's own history.)")
    late = firing[0] - t_freeze
    age_then = max(max(x[3] or 0, x[4] or 0) for x in live.truth[STALL] if x[0] <= firing[0])
    if late > FIRE_WITHIN:
        raise LabCheckFailed(
            f"Your alert fired for {STALL} only {late:.1f} s after its worker froze; the lab asks "
            f"for at most {FIRE_WITHIN:g} s (by then its oldest message had waited "
            f"{age_then:.1f} s).")
    # it stays on while the stall lasts: until the queue starts draining after the rescue
    still_stalled = [(t, f) for t, f in live.fired[STALL] if firing[0] <= t < marks["rescue"]]
    off = [t for t, f in still_stalled if not f]
    if off:
        raise LabCheckFailed(
            f"Your alert fired for {STALL} at {_fmt(firing[0], t0)} and went quiet at "
            f"{_fmt(off[0], t0)}, while the queue was still stalled (its worker frozen, its "
            "oldest message older every second). An alert that goes quiet mid-incident looks "
            "resolved: it should fire as long as the condition holds.")
    ok(f"fired for the stall {late:.1f} s after its worker froze (oldest age then "
       f"{age_then:.1f} s), and stayed on while it lasted")

    t_drained = marks["drained"]
    after = [(t, f) for t, f in live.fired[STALL] if t >= t_drained + CLEAR_WITHIN]
    still = [t for t, f in after if f]
    if still:
        raise LabCheckFailed(
            f"Your alert was still firing for {STALL} {still[-1] - t_drained:.1f} s after the "
            "queue had drained (depth 0, nothing waiting) once a second worker was added. An "
            "alert that does not clear hides the next incident.")
    cleared = next(t for t, f in live.fired[STALL] if t > firing[0] and not f)
    ok(f"cleared {max(0.0, cleared - t_drained):.1f} s after the stalled queue drained")


def _replay(lag_alert, readings):
    """Feed ``(depth, oldest_age)`` readings, one every TICK, to the alert as the live run does;
    return its verdicts."""
    t0, history, verdicts = time.time(), [], []
    for i, (depth, age) in enumerate(readings):
        history.append({"t": t0 + i * TICK, "depth": depth, "oldest_age": age})
        verdicts.append(bool(call_learner(lag_alert, [dict(h) for h in history],
                                          what="lag_alert")))
    return verdicts


# Situations the live run cannot make on every machine, replayed (one reading every TICK):
# an ordinary burst, recorded from a real run (``./course bench --record-burst``: 150 tasks at
# once on a four-child worker; its date and machine are in the file), whose oldest reaches
# 1.5-2 s (the lab's table: "at most 2 s") and drains; a busy but healthy queue (25 waiting, none
# older than 0.1 s); a low-rate queue nobody consumes (one message every 10 s, so it never gets
# deep, while its oldest waits a minute).
BURST_RECORDING = json.loads(BURST_FILE.read_text())
assert BURST_RECORDING["tick_seconds"] == TICK, "re-record the burst at the checker's tick"
BURST_TRACE = [(depth, age) for depth, age in BURST_RECORDING["readings"]]
BURST_AGES = [age for _depth, age in BURST_TRACE]
BURST_PEAK = max(a for a in BURST_AGES if a is not None)
BUSY_TRACE = [(25, 0.1)] * 24  # 6 s
STALL_TRACE = [(1 + int(i * TICK // 10), i * TICK) for i in range(int(60 / TICK) + 1)]
STALL_FIRE_BY = 10.0  # s of oldest age: the live stall asks for 6 s after the freeze


def _check_traces(lag_alert) -> None:
    fired = _replay(lag_alert, BURST_TRACE)
    if any(fired):
        age = BURST_AGES[fired.index(True)]
        raise LabCheckFailed(
            f"Your alert fires for an ordinary burst: fed the readings recorded from a real one "
            f"(its oldest message reached {BURST_PEAK:.1f} s, and it drained by itself within "
            f"{len(BURST_TRACE) * TICK:.0f} s), it fired at the reading where the oldest had "
            f"waited {age} s. Nobody needs to be woken for that.")
    if any(_replay(lag_alert, BUSY_TRACE)):
        raise LabCheckFailed(
            "Your alert fires for a busy but healthy queue: fed 6 s of readings with 25 messages "
            "waiting and none older than 0.1 s (workers keeping up with a high rate), it fired. "
            "How many wait says little; how long they wait is what users feel.")
    fired = _replay(lag_alert, STALL_TRACE)
    by = int(STALL_FIRE_BY / TICK)
    if not any(fired[:by + 1]):
        raise LabCheckFailed(
            "Your alert did not fire for a quiet queue that nobody consumes: fed a minute of "
            f"readings with 1 to {STALL_TRACE[-1][0]} messages waiting (one new every 10 s) and "
            f"the oldest waiting up to 60 s, it had not fired by the time the oldest had waited "
            f"{STALL_FIRE_BY:.0f} s{'' if any(fired) else ', nor ever'}. A low-traffic queue "
            "never gets deep: its stall shows only in the age.")
    first = fired.index(True)
    if not all(fired[first:]):
        raise LabCheckFailed(
            "Your alert, for a quiet queue nobody consumes (the oldest waiting up to 60 s), went "
            "quiet again while nothing had changed: it should fire as long as the condition "
            "holds.")


@checker
def check_lab07(sample_queue, lag_alert, stack) -> None:
    """Lab 7: a read-only lag sampler, and an alert that fires for a stall, not for a burst."""
    r = stack.redis
    stack.reset()
    flags = _command_flags(r)
    try:
        _check_sampler(sample_queue, stack, flags)
        live = _Live(stack, sample_queue, lag_alert, flags)
        marks = live.run()
        _judge(live, marks)
        _check_traces(lag_alert)  # after the live verdicts, which name what happened
    finally:
        if not stack.external:
            try:
                r.acl_deluser(READER)
            except redis.RedisError:
                pass
    print("Lab 7 passed: your sampler reads depth and lag without touching the queues, and your "
          "alert pages for a stalled queue, not for a burst, and clears after recovery.")
