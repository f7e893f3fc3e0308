"""Lab 4 checker: every payment applied exactly once through crashes and duplicate deliveries.

What it does to the learner's ``apply_payment`` (a real worker, 4 pool processes):

    A, B   the whole worker is SIGKILLed while A is credited (in its last bank call) and B is in
           its first; the broker's clock is fast-forwarded for its unacknowledged messages (as if
           the visibility timeout, an hour, had passed) and it is restarted: A must not be
           credited twice, B must not be lost
    E      sent, applied, then sent again (a client retrying): credited once
    F      two copies published together, run side by side in LOCKSTEP (``celerylab.chaos``: each
           Redis command of one copy waits for the other copy to reach the same command): a
           check-then-write race shows every time, not 1 run in 3
    G      its pool child is SIGKILLed mid-authorize (what the OOM killer does): not lost
    H      its process SIGKILLs itself right after its first write through ``db``: a check and a
           credit in two commands are caught (lost, or credited twice after the redelivery)

and it watches the answer's keys: a payment's memory must outlive a redelivery (more than an hour left when the check runs).
Everything after the restart runs at once, and the verdicts come in the order above.

The lab keeps the default visibility timeout (an hour) and the checker ages only the dead
worker's messages, rather than a short timeout for everything: a worker takes up to ~5 s to notice
a dead pool child, and a timeout shorter than that would redeliver G's or H's message before
Celery decides its fate, so an answer that loses them would pass at random (and a task held up in
lockstep would be delivered a third time).
"""

from __future__ import annotations

import time

from celerylab import chaos
from celerylab.checks.common import LabCheckFailed, MachineTooBusy, checker, ok

LAB04_TASK = "lab04_tasks.apply_payment"
AMOUNTS = {"A": 1000, "B": 2000, "E": 5, "F": 60, "G": 700, "H": 8000}
MEMORY_FLOOR = 3600  # s: the default visibility timeout; a payment's memory must last longer
SETTLE = 60.0  # s: generous; everything after the restart normally settles within ~10 s
COURSE_KEYS = {"celery", "unacked", "unacked_index", "unacked_mutex", "bank:calls", "balances"}
COURSE_PREFIXES = ("celerylab:", "_kombu.", "celery-task-meta-", "celery-taskset-meta-")


def _message_location(r, task_id: str, queue: str = "celery") -> str:
    import json
    if any(json.loads(m)["headers"]["id"] == task_id for m in r.lrange(queue, 0, -1)):
        return "queue"
    if any(json.loads(v)[0]["headers"]["id"] == task_id for v in r.hvals("unacked")):
        return "unacked"
    return "gone"


def _fast_forward_visibility(r) -> int:
    """Rewrite the fetch times kombu stored for every unacknowledged message (their
    ``unacked_index`` scores) to 0, as if the visibility timeout, an hour, had passed: the restore
    sweep that the restarted worker runs at start puts them back on their queue. That sweep takes
    ``unacked_mutex`` without waiting and skips while anyone holds it; only the dead worker could
    hold it now (for up to 300 s), so it is cleared. Returns how many messages were aged."""
    tags = r.hkeys("unacked")
    if tags:
        r.zadd("unacked_index", {tag: 0 for tag in tags}, xx=True)
    r.delete("unacked_mutex")
    return len(tags)


def _bank_calls(r) -> list[str]:
    return [c.decode() for c in r.lrange("bank:calls", 0, -1)]


def _short_memories(r) -> list[tuple[str, float]]:
    """Keys the answer made that expire sooner than a redelivery can come: (key, seconds left)."""
    out = []
    for raw in r.scan_iter(count=500):
        key = raw.decode(errors="replace")
        if key in COURSE_KEYS or key.startswith(COURSE_PREFIXES):
            continue
        ms = r.pttl(raw)
        if 0 < ms < MEMORY_FLOOR * 1000:
            out.append((key, ms / 1000))
    return out


def _check_memory(r, payment: str) -> None:
    short = _short_memories(r)
    if short:
        key, left = min(short, key=lambda kv: kv[1])
        raise LabCheckFailed(
            f"Your code remembers payments in keys that expire: `{key}` is gone in {left:.0f} s. "
            f"Once the memory of a payment has expired, a redelivered or re-sent {payment} is not "
            "recognised any more, and it is credited again. A message comes back after the "
            "broker's visibility timeout (an hour by default, and in this lab), and a client may "
            "re-send a payment later still: how long must a payment be remembered?")


def _worker_lost(res) -> bool:
    exc = res.result
    return type(exc).__name__ == "WorkerLostError" or "exited prematurely" in str(exc)


def _raise_if_answer_failed(res, label: str) -> None:
    if res.state == "FAILURE" and not _worker_lost(res):
        raise LabCheckFailed(f"apply_payment failed for pay-{label}: {res.result!r}. Run it by hand "
                             "(start a worker, send one payment) to see why.")


@checker
def check_lab04(stack) -> None:
    """Lab 4: every payment applied exactly once through crashes and duplicate deliveries."""
    from celerylab.workers import WorkerError

    r = stack.redis
    stack.reset()
    worker = stack.worker("lab04_tasks", name="payments", concurrency=4, prefetch_multiplier=1)
    try:
        worker.start()
    except WorkerError as exc:
        if "NotImplementedError" in str(exc):
            raise LabCheckFailed("lab04_tasks.py still has a `raise NotImplementedError` line: "
                                 "write your code there, re-run the %%writefile cell, then this "
                                 "check.") from None
        raise LabCheckFailed(f"The worker could not import lab04_tasks.py:\n{exc}") from None
    send = stack.control.send_task

    def pay(k):
        return send(LAB04_TASK, (f"pay-{k}", f"acct-{k}", AMOUNTS[k]))

    def reached(call, res, label):
        def ready():
            _raise_if_answer_failed(res, label)
            return call in _bank_calls(r)
        return stack.wait_until(ready, 20, f"the bank call {call}")

    try:
        # A and B: the whole worker dies ------------------------------------------------------
        a = pay("A")
        reached("notify:pay-A", a, "A")  # A is credited and in its last, slow call
        _check_memory(r, "pay-A")
        b = pay("B")
        reached("authorize:pay-B", b, "B")  # B is in its first call, not credited yet
        worker.kill()
        if _message_location(r, b.id) == "gone":
            raise LabCheckFailed(
                "The worker died while pay-B was in the bank's authorize call, and pay-B's "
                "message is gone from Redis: it will never be applied. When is a message "
                "acknowledged by default, and how do you make that happen later?")
        ok("the whole worker killed mid-payment: the payments' messages stayed in Redis")
        _fast_forward_visibility(r)  # an hour later, for these messages only
        worker.start()

        # everything else at once ------------------------------------------------------------
        chaos.arm_lockstep(r, "pay-F")
        chaos.arm_crash(r, "pay-H")
        f1, f2 = pay("F"), pay("F")  # one payment, delivered twice at the same moment
        g, h, e1 = pay("G"), pay("H"), pay("E")
        e2 = None
        results = {"A": [a], "B": [b], "E": [e1], "F": [f1, f2], "G": [g], "H": [h]}
        g_kill = None
        deadline = time.monotonic() + SETTLE
        while True:
            if g_kill is None and "authorize:pay-G" in _bank_calls(r):
                started = [x for x in stack.records([g.id]) if x.started]
                if started:
                    worker.kill_child(started[0].pid)  # mid-authorize, like the OOM killer
                    g_kill = (time.monotonic(), not chaos.log(r, "pay-G"))
            for label, rs in results.items():
                for res in rs:
                    _raise_if_answer_failed(res, label)
            if e2 is None and e1.state == "SUCCESS":
                e2 = pay("E")  # the client retries: the same payment id, a new message
                results["E"].append(e2)
            must = [a, b, e1, f1, f2] + ([e2] if e2 else [None])
            done = all(x is not None and x.state == "SUCCESS" for x in must) and \
                all(x.state in ("SUCCESS", "FAILURE") for x in (g, h))
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        late = [label for label, rs in results.items() if label not in ("G", "H")
                for x in rs if x.state != "SUCCESS"]
        if e2 is None:
            late.append("E")
        if late:
            raise LabCheckFailed(
                f"Not every payment finished within {SETTLE:.0f} s: {sorted(set(late))} did not "
                "succeed (their messages are still on their way, or stuck). Look at the worker's "
                "log: stack.worker_log('payments').")
        _check_memory(r, "a payment")
        fate = {"G": g.state, "H": h.state}
        g_results = {k: (results[k][-1].result if fate[k] == "FAILURE" else None) for k in "GH"}
    finally:
        stack.stop_workers()

    balances = {k: int(r.hget("balances", f"acct-{k}") or 0) for k in AMOUNTS}
    print(f"  balances (cents): {balances}")

    def wrong(k):
        return balances[k] != AMOUNTS[k]

    if wrong("A"):
        raise LabCheckFailed(
            f"acct-A holds {balances['A']}, expected {AMOUNTS['A']}. pay-A was credited, then the "
            "worker died before the task returned; its message came back and ran again. How can "
            "the task recognise a payment it has already applied?")
    if wrong("B"):
        raise LabCheckFailed(
            f"acct-B holds {balances['B']}, expected {AMOUNTS['B']}: the worker died while pay-B "
            "was in the bank's authorize call, its message came back, and pay-B was not applied "
            "exactly once.")
    ok("the crashed worker's payments came back and were applied once")
    if wrong("E"):
        raise LabCheckFailed(
            f"acct-E holds {balances['E']}, expected {AMOUNTS['E']}: the client sent pay-E twice "
            "(same payment id, two messages), and it was applied twice. Recognise duplicates by "
            "payment id.")
    ok("a payment sent again after it was applied was recognised")

    f_log = chaos.log(r, "pay-F")
    if wrong("F"):
        raise LabCheckFailed(
            f"acct-F holds {balances['F']}, expected {AMOUNTS['F']}: pay-F arrived twice at the "
            "same moment, two processes ran it side by side (each Redis command of one copy "
            "waited for the other copy to reach the same command), and both copies credited it. "
            "When a payment is checked in one command and marked or credited in a later one, "
            "the other copy slips into the gap.")
    if not f_log:
        raise LabCheckFailed(
            "pay-F sent no command through the module's `db` client: the checker runs duplicate "
            "deliveries side by side, and crashes payments between writes, through `db` only. "
            "Write through `db` (a client of your own escapes the checker, not the OOM killer).")
    if 1 not in chaos.met(r, "pay-F"):
        raise MachineTooBusy("the two copies of pay-F did not run side by side (one of them "
                             "waited more than 10 s for a pool process).")
    ok("one payment delivered twice at the same moment, run in lockstep: credited once")

    if wrong("G") and balances["G"] == 0:
        seconds = time.monotonic() - g_kill[0] if g_kill else 0
        did = (f"pay-G never ran again: its message was acknowledged and its result is FAILURE "
               f"({g_results['G']!r})" if fate["G"] == "FAILURE" else
               f"{seconds:.0f} s later pay-G was still waiting to be retried (state RETRY): "
               "when is that retry due, by default?" if fate["G"] == "RETRY" else
               f"{seconds:.0f} s later pay-G had still not run again (its state: {fate['G']})")
        raise LabCheckFailed(
            "pay-G was lost: its pool process was SIGKILLed during the bank's authorize call, "
            "what the kernel's OOM killer does to a process that grows too big. The worker "
            f"started a new process, but {did}. What does Celery do with the message of a task "
            "whose process died, and can you change that?")
    if wrong("G"):
        raise LabCheckFailed(
            f"acct-G holds {balances['G']}, expected {AMOUNTS['G']}: its pool process was "
            "SIGKILLed during the bank's authorize call, before your code ran, and the payment "
            "was not applied exactly once after that.")
    if g_kill is None or not g_kill[1]:
        raise MachineTooBusy("the checker could not kill pay-G's process before it reached "
                             "your code.")
    ok("a pool process SIGKILLed mid-payment (the OOM killer's way): the payment was applied once")

    crash = chaos.crashes(r, "pay-H")
    h_log = chaos.log(r, "pay-H")
    if not crash:
        sent = "sent no command at all" if not h_log else "made no write"
        raise LabCheckFailed(
            f"The checker was ready to kill pay-H's process right after its first write through "
            f"the module's `db`, but pay-H {sent} through `db`: the checker watches that client "
            "only. Write through `db` (a client of your own escapes the checker, not the OOM "
            "killer).")
    after = " + ".join(c.upper() for c in crash[0]["after"])
    runs = len([x for x in stack.records([h.id]) if x.started])
    if wrong("H") and balances["H"] == 0 and runs < 2:
        did = (f"its result is FAILURE ({g_results['H']!r})" if fate["H"] == "FAILURE" else
               f"its state is {fate['H']}")
        raise LabCheckFailed(
            f"pay-H was lost: the checker killed its process right after its first write ({after}), "
            f"as the OOM killer could, and pay-H never ran again: {did}. What does Celery do with "
            "the message of a task whose process died?")
    if wrong("H") and balances["H"] == 0:
        raise LabCheckFailed(
            f"pay-H was lost: the checker killed its process right after its first write ({after}), "
            "as the OOM killer could between two writes. pay-H ran again, and was not credited: "
            "what the first run wrote made the second run believe pay-H was already applied. "
            "What does your code leave behind when it dies between its writes?")
    if wrong("H"):
        raise LabCheckFailed(
            f"acct-H holds {balances['H']}, expected {AMOUNTS['H']}: the checker killed pay-H's "
            f"process right after its first write ({after}), as the OOM killer could between two "
            "writes. pay-H ran again and was credited again: what the first run wrote did not let "
            "the second run recognise the payment. What does your code leave behind when it dies "
            "between its writes?")
    ok(f"a process killed right after its first write ({after}): the payment was applied once")
    print("Lab 4 passed: crash-safe and idempotent.")
