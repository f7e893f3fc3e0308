"""Lab 4 checker: every payment applied exactly once through crashes and duplicate deliveries.

What it does to the learner's ``apply_payment`` (a real worker, 4 pool processes):

    A, B   the whole worker is SIGKILLed while A is credited (in its last bank call) and B is in
           its first; the broker's clock is fast-forwarded for its unacknowledged messages (as if
           the visibility timeout, an hour, had passed) and it is restarted: A must not be
           credited twice, B must not be lost
    C, D   two different payments with the same amount to one account, D sent once C is applied:
           both credited (idempotency keyed on the account, or the amount, drops D)
    E      sent, applied, then sent again (a client retrying): credited once
    F      two copies published together, run side by side in LOCKSTEP (``celerylab.chaos``: each
           Redis command of one copy waits for the other copy to reach the same command): a
           check-then-write race shows every time, not 1 run in 3
    G      its pool child is SIGKILLed mid-authorize (what the OOM killer does): not lost
    H1..Hn pay-Hk's process SIGKILLs itself right after its write #k through ``db``, for every k
           from 1 to n, the number of writes pay-A made before the worker crash (it is in its
           last bank call by then), or pay-E's first whole run when that made more (writes after
           the last bank call count too; at most ``MAX_CRASHES`` are tried, and the pass line
           says so when there were more), each on its own payment and account: any two
           writes that must go together are caught, whichever they are (lost, or credited twice
           after the redelivery); and each redelivered run, a duplicate once the first run had
           written, is killed in turn right after ITS write #1, then the next after its #2, if it
           gets that far (``CRASHES_PER_PAYMENT``: a duplicate's own writes, such as a refund
           after a mark already taken, must not be split either)
    credit pay-A's writes through ``db`` must touch ``balances`` (a credit made through a client
           of the answer's own escapes every injection above)

and it watches the answer's keys: a payment's memory must outlive a redelivery (more than an hour
left when the check runs). Everything after the restart runs at once, and the verdicts come in the
order above.

Outcomes come from the course's recording (``task_postrun`` in the pool process, see
``celerylab.recording``), so an answer that ignores its results is judged like any other. The
result backend is read only for what the recording cannot see: the FAILURE a worker's main process
stores for a task whose pool process died (``WorkerLostError``), and an answer's exception (with
the worker's log as the fallback when results are ignored).

The lab keeps the default visibility timeout (an hour) and the checker ages only the dead
worker's messages, rather than a short timeout for everything: a worker takes up to ~5 s to notice
a dead pool child, and a timeout shorter than that would redeliver G's or H's message before
Celery decides its fate, so an answer that loses them would pass at random (and a task held up in
lockstep would be delivered a third time).

Known limit: the memory check reads key TTLs only. Expiry built into the data (a sorted set of
recent payments trimmed to the last minute, a list capped at 100 entries) is invisible to it, and
so is a memory the answer deletes itself. The lab text says how long a payment must be remembered
(at least as long as a redelivery can take: the visibility timeout, an hour by default).
"""

from __future__ import annotations

import json
import time

from celerylab import chaos, recording
from celerylab.broker import OWNER_KEY
from celerylab.checks.common import LabCheckFailed, MachineTooBusy, checker, ok

LAB04_TASK = "lab04_tasks.apply_payment"
AMOUNTS = {"A": 1000, "B": 2000, "C": 300, "D": 300, "E": 5, "F": 60, "G": 700, "H": 8000}
ACCOUNTS = {"D": "acct-C"}  # pay-D goes to pay-C's account; every other payment to its own
MAX_CRASHES = 6  # crash positions tried: after writes #1..#6 (an answer may make more)
CRASHES_PER_PAYMENT = 3  # a first run killed after its write #k, then its redeliveries after #1, #2
MEMORY_FLOOR = 3600  # s: the default visibility timeout; a payment's memory must last longer
SETTLE = 60.0  # s: generous; everything after the restart normally settles within ~10 s
GONE_FOR = 5.0  # s a killed payment's message stays gone, with no new attempt, before it is lost
# what the course, kombu and the lab's given code write (only these are not the answer's memory);
# results (celery-task-meta-<id>) are exempt for the task ids the recording saw, and no others
COURSE_KEYS = {"celery", "unacked", "unacked_index", "unacked_mutex", "bank:calls", "balances",
               "_kombu.binding_deadlines", recording.EVENTS, OWNER_KEY}
COURSE_PREFIXES = (recording.READY, chaos.PREFIX, "_kombu.binding.", "_kombu.binding_permanent.")
RESULT_PREFIX = "celery-task-meta-"
QUESTION_LOST = ("What does Celery do with the message of a task whose process died, and can you "
                 "change that?")


def _message_ids(r, queue: str = "celery") -> set[str]:
    """Ids of the task messages waiting in ``queue`` or held unacknowledged by a worker."""
    raws = [m for m in r.lrange(queue, 0, -1)] + [v for v in r.hvals("unacked")]
    ids = set()
    for raw in raws:
        try:
            msg = json.loads(raw)
            msg = msg[0] if isinstance(msg, list) else msg
            ids.add(str(msg["headers"]["id"]))
        except (ValueError, KeyError, TypeError, IndexError):
            continue
    return ids


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


def _course_key(key: str, task_ids: set[str]) -> bool:
    if key in COURSE_KEYS or key.startswith(COURSE_PREFIXES):
        return True
    return key.startswith(RESULT_PREFIX) and key[len(RESULT_PREFIX):] in task_ids


def _short_memories(r) -> list[tuple[str, float]]:
    """Keys the answer made that expire sooner than a redelivery can come: (key, seconds left)."""
    task_ids = {str(e.get("id")) for e in recording.read_events(r)}
    out = []
    for raw in r.scan_iter(count=500):
        key = raw.decode(errors="replace")
        if _course_key(key, task_ids):
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


def _failure_from_log(worker, task_id: str) -> str | None:
    """The exception the worker logged for ``task_id`` ("... raised unexpected: <repr>")."""
    marker = f"[{task_id}] raised unexpected: "
    try:
        text = worker.logfile.read_text(errors="replace")
    except OSError:
        return None
    lines = [line.split(marker, 1)[1].strip() for line in text.splitlines() if marker in line]
    return lines[-1] if lines else None


def _answer_failed(worker, res, label: str) -> LabCheckFailed:
    """The hint for a payment whose task raised (the recording saw it finish in FAILURE)."""
    if res.state == "FAILURE" and not _worker_lost(res):
        what = repr(res.result)
    else:  # results ignored (or not stored yet): the worker's log has the exception
        what = _failure_from_log(worker, res.id) or \
            "(its exception is not stored, as the task ignores its results; see the worker's log)"
    return LabCheckFailed(f"apply_payment failed for pay-{label}: {what}. Run it by hand (start a "
                          "worker, send one payment) to see why.")


class _Runs:
    """One reading of the recording: the attempts of every task id the checker sent."""

    def __init__(self, stack, ids) -> None:
        self.by_id: dict[str, list] = {}
        for a in stack.records(list(ids)):
            self.by_id.setdefault(a.id, []).append(a)

    def of(self, task_id: str) -> list:
        return self.by_id.get(task_id, [])

    def succeeded(self, task_id: str) -> bool:
        return any(a.state == "SUCCESS" for a in self.of(task_id))

    def failed(self, task_id: str) -> bool:
        return any(a.state == "FAILURE" for a in self.of(task_id))

    def started(self, task_id: str) -> list:
        return [a for a in self.of(task_id) if a.started]

    def running_besides(self, task_id: str, dead_pid: int | None) -> bool:
        """An attempt is running in a process other than the one that was killed."""
        return any(a.started and not a.finished and a.pid != dead_pid for a in self.of(task_id))

    def retried(self, task_id: str) -> bool:
        """A retry of the task was published (a ``sent`` with retries > 0) and has not run."""
        return any(a.sent and a.retries and not a.started for a in self.of(task_id))


class _Killed:
    """A payment whose process was killed: when, which process, and since when its message has
    been gone from Redis (neither queued nor held by a worker)."""

    def __init__(self, pid: int | None, before_answer: bool = True) -> None:
        self.at = time.time()
        self.pid = pid
        self.before_answer = before_answer
        self.gone_since: float | None = None

    def watch(self, present: bool) -> None:
        self.gone_since = None if present else (self.gone_since or time.monotonic())

    def lost(self, runs: _Runs, task_id: str) -> bool:
        """Gone for GONE_FOR seconds with no attempt running elsewhere: nothing can bring it back
        (kombu restores and requeues a message in one transaction, a retry is published before
        the original is acknowledged; the wait covers a fetch, between BRPOP and HSET unacked)."""
        return (self.gone_since is not None and time.monotonic() - self.gone_since > GONE_FOR
                and not runs.running_besides(task_id, self.pid))


def _fate(res, runs: _Runs, killed: _Killed | None, ignored: bool, label: str) -> tuple[str, str]:
    """What became of a killed payment that was not credited, and the question to ask."""
    seconds = time.time() - killed.at if killed else 0
    note = (" (the result backend would tell what the worker decided, but your task's results are "
            "not stored: ignore_result)") if ignored else ""
    if res.state == "FAILURE":
        return (f"pay-{label} never ran again: its message was acknowledged and its result is "
                f"FAILURE ({res.result!r})", QUESTION_LOST)
    if runs.retried(res.id) or res.state == "RETRY":
        return (f"{seconds:.0f} s later pay-{label} was still waiting for the retry the worker "
                "published for it (state RETRY)", "When is that retry due, by default?")
    if killed and killed.gone_since is not None:
        return (f"pay-{label} never ran again, and its message is gone from Redis: the worker "
                f"acknowledged it{note}", QUESTION_LOST)
    return (f"{seconds:.0f} s later pay-{label} had still not run again (its state: "
            f"{res.state}){note}", QUESTION_LOST)


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
    sent: dict[str, list] = {}  # label -> its messages (AsyncResult), in order
    killed: dict[str, _Killed] = {}  # label -> its process's death (G by the checker, H* by chaos)
    crashable: set[str] = set()

    def pay(label):
        kind = label.rstrip("0123456789")
        res = send(LAB04_TASK, (f"pay-{label}", ACCOUNTS.get(label, f"acct-{label}"),
                                AMOUNTS[kind]))
        sent.setdefault(label, []).append(res)
        return res

    def runs_now():
        return _Runs(stack, [x.id for rs in sent.values() for x in rs])

    def pending(runs):
        """Labels not done yet: G and H* until settled, every other message until it succeeds."""
        return [label for label, rs in sent.items()
                if (not settled(label, runs) if label in crashable else
                    not all(runs.succeeded(x.id) for x in rs))]

    def settled(label, runs):
        """Succeeded, or killed and then failed (stored by the worker) or lost for good."""
        res = sent[label][0]
        if runs.succeeded(res.id):
            return True
        dead = killed.get(label)
        return dead is not None and (res.state == "FAILURE" or dead.lost(runs, res.id))

    def raise_if_failed(runs):
        for label, rs in sent.items():
            for res in rs:
                if runs.failed(res.id):
                    raise _answer_failed(worker, res, label)

    def reached(call):
        def ready():
            raise_if_failed(runs_now())
            return call in _bank_calls(r)
        return stack.wait_until(ready, 20, f"the bank call {call}")

    try:
        # A and B: the whole worker dies ------------------------------------------------------
        a = pay("A")
        reached("notify:pay-A")  # A is credited and in its last, slow call
        _check_memory(r, "pay-A")
        a_writes = [w["commands"] for w in chaos.writes(r, "pay-A")]  # one run, uncrashed so far
        if a_writes and not any("balances" in w.get("keys", []) or  # a script may not say
                                set(w["commands"]) & {"eval", "evalsha", "fcall"}
                                for w in chaos.writes(r, "pay-A")):
            raise LabCheckFailed(
                "pay-A was credited, but none of its writes through the module's `db` touched "
                "`balances`: the credit went through a client of its own. The checker kills "
                "payments between writes, and runs duplicates side by side, through `db` only; "
                "the OOM killer does not spare another client. Write the credit through `db`.")
        b = pay("B")
        reached("authorize:pay-B")  # B is in its first call, not credited yet
        worker.kill()
        if b.id not in _message_ids(r):
            raise LabCheckFailed(
                "The worker died while pay-B was in the bank's authorize call, and pay-B's "
                "message is gone from Redis: it will never be applied. When is a message "
                "acknowledged by default, and how do you make that happen later?")
        ok("the whole worker killed mid-payment: the payments' messages stayed in Redis")
        _fast_forward_visibility(r)  # an hour later, for these messages only
        worker.start()

        # everything else at once ------------------------------------------------------------
        n_crashes = min(max(1, len(a_writes)), MAX_CRASHES)
        crash_labels = [f"H{k}" for k in range(1, n_crashes + 1)]
        crashable.update(["G", *crash_labels])

        def crash_payment(k):  # pay-Hk: killed right after its write #k
            label = f"H{k}"
            if label not in crash_labels:
                crash_labels.append(label)
                crashable.add(label)
            chaos.arm_crash(r, f"pay-{label}", after=k)

        for k in range(1, n_crashes + 1):
            crash_payment(k)
        chaos.arm_lockstep(r, "pay-F")
        pay("F")  # one payment, delivered twice at the same moment
        pay("F")
        g = pay("G")
        e1, c = pay("E"), pay("C")
        for label in crash_labels:
            pay(label)
        armed_after: dict[str, int] = {}  # label -> crashes seen when its next crash was armed
        e_writes: list = []
        deadline = time.monotonic() + SETTLE
        while True:
            runs = runs_now()
            raise_if_failed(runs)
            if "G" not in killed and "authorize:pay-G" in _bank_calls(r):
                started = runs.started(g.id)
                if started and not started[0].finished:
                    worker.kill_child(started[0].pid)  # mid-authorize, like the OOM killer
                    killed["G"] = _Killed(started[0].pid, not chaos.log(r, "pay-G"))
            fired: dict[str, list] = {}
            for crash in chaos.crashes(r):
                fired.setdefault(crash["job"].removeprefix("pay-"), []).append(crash)
            for label, crashes in fired.items():
                # each redelivery, a duplicate once the first run had written, is killed in
                # turn after its own write #1, then #2: a duplicate's writes (an undo) split too
                if armed_after.get(label) != len(crashes) and len(crashes) < CRASHES_PER_PAYMENT:
                    armed_after[label] = len(crashes)
                    chaos.arm_crash(r, f"pay-{label}", after=crashes[-1]["write"] + len(crashes))
                if label not in killed or killed[label].pid != crashes[-1]["pid"]:
                    killed[label] = _Killed(crashes[-1]["pid"])  # the latest death counts
            if len(sent["E"]) == 1 and runs.succeeded(e1.id) and not e_writes:
                # a whole run, which pay-A's was not (killed in notify): more crash positions
                e_writes = [w["commands"] for w in chaos.writes(r, "pay-E")
                            if w["task"] == e1.id] or [[]]
                for k in range(n_crashes + 1, min(len(e_writes), MAX_CRASHES) + 1):
                    crash_payment(k)
                    pay(f"H{k}")
            if len(sent["E"]) == 1 and runs.succeeded(e1.id):
                pay("E")  # the client retries: the same payment id, a new message
            if "D" not in sent and runs.succeeded(c.id):
                pay("D")  # another payment to the same account, with the same amount
            unsettled = [k for k in killed if not runs.succeeded(sent[k][0].id)]
            if unsettled:
                present = _message_ids(r)
                for label in unsettled:
                    killed[label].watch(sent[label][0].id in present)
            done = len(sent["E"]) == 2 and "D" in sent and not pending(runs)
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        runs = runs_now()
        late = sorted(set(pending(runs)) - set(killed) |
                      ({"E"} if len(sent["E"]) < 2 else set()) |
                      ({"D"} if "D" not in sent else set()))
        if late:
            raise LabCheckFailed(
                f"Not every payment finished within {SETTLE:.0f} s: {late} did not succeed "
                "(their messages are still on their way, or stuck). Look at the worker's log: "
                "stack.worker_log('payments').")
        _check_memory(r, "a payment")
        ignored = stack.control.AsyncResult(a.id).state == "PENDING"  # a SUCCESS, not stored
    finally:
        worker.kill()  # the verdict is taken: no need to wait for a warm shutdown
        stack.stop_workers()

    accounts = sorted({ACCOUNTS.get(label, f"acct-{label}") for label in sent})
    balances = {acct: int(r.hget("balances", acct) or 0) for acct in accounts}
    print(f"  balances (cents): {balances}")

    def held(label):
        return balances[ACCOUNTS.get(label, f"acct-{label}")]

    def wrong(label):
        return held(label) != AMOUNTS[label.rstrip("0123456789")]

    if wrong("A"):
        raise LabCheckFailed(
            f"acct-A holds {held('A')}, expected {AMOUNTS['A']}. pay-A was credited, then the "
            "worker died before the task returned; its message came back and ran again. How can "
            "the task recognise a payment it has already applied?")
    if wrong("B"):
        raise LabCheckFailed(
            f"acct-B holds {held('B')}, expected {AMOUNTS['B']}: the worker died while pay-B "
            "was in the bank's authorize call, its message came back, and pay-B was not applied "
            "exactly once.")
    ok("the crashed worker's payments came back and were applied once")
    if wrong("E"):
        raise LabCheckFailed(
            f"acct-E holds {held('E')}, expected {AMOUNTS['E']}: the client sent pay-E twice "
            "(same payment id, two messages), and it was applied twice. Recognise duplicates by "
            "payment id.")
    ok("a payment sent again after it was applied was recognised")
    both = AMOUNTS["C"] + AMOUNTS["D"]
    if held("C") == AMOUNTS["C"]:
        raise LabCheckFailed(
            f"acct-C holds {held('C')}, expected {both}: two different payments to one account, "
            f"and one was dropped: pay-C and pay-D, {AMOUNTS['C']} cents each, both went to "
            "acct-C, and pay-D, sent once pay-C was applied, was taken for a payment already "
            "applied. What tells one payment from another?")
    if held("C") != both:
        raise LabCheckFailed(
            f"acct-C holds {held('C')}, expected {both}: two different payments to one account "
            f"(pay-C and pay-D, {AMOUNTS['C']} cents each) were not each applied once.")
    ok("two different payments of the same amount to one account: both applied")

    f_log = chaos.log(r, "pay-F")
    if wrong("F"):
        raise LabCheckFailed(
            f"acct-F holds {held('F')}, expected {AMOUNTS['F']}: pay-F arrived twice at the "
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

    g_killed = killed.get("G")
    if wrong("G") and held("G") == 0:
        did, question = _fate(g, runs, g_killed, ignored, "G")
        raise LabCheckFailed(
            "pay-G was lost: its pool process was SIGKILLed during the bank's authorize call, "
            "what the kernel's OOM killer does to a process that grows too big. The worker "
            f"started a new process, but {did}. {question}")
    if wrong("G"):
        raise LabCheckFailed(
            f"acct-G holds {held('G')}, expected {AMOUNTS['G']}: its pool process was "
            "SIGKILLed during the bank's authorize call, before your code ran, and the payment "
            "was not applied exactly once after that.")
    if g_killed is None or not g_killed.before_answer:
        raise MachineTooBusy("the checker could not kill pay-G's process before it reached "
                             "your code.")
    ok("a pool process SIGKILLed mid-payment (the OOM killer's way): the payment was applied once")

    whole = e_writes if len(e_writes) > len(a_writes) and e_writes != [[]] else a_writes
    writes = ", ".join(f"#{i} {' + '.join(c.upper() for c in cmds)}"
                       for i, cmds in enumerate(whole, 1)) or "none"
    run_of = "pay-E's first run" if whole is e_writes else "pay-A's run"
    yours = f"(your payment's writes through `db`, in {run_of}: {writes})"
    tried = []
    for k, label in enumerate(crash_labels, 1):
        job, want = f"pay-{label}", AMOUNTS["H"]
        crash = chaos.crashes(r, job)
        if not crash and k == 1:
            sent_any = "sent no command at all" if not chaos.log(r, job) else "made no write"
            raise LabCheckFailed(
                f"The checker was ready to kill {job}'s process right after its first write "
                f"through the module's `db`, but {job} {sent_any} through `db`: the checker "
                "watches that client only. Write through `db` (a client of your own escapes the "
                "checker, not the OOM killer).")
        if not crash:
            continue  # this payment made fewer writes than pay-A: nothing to crash after
        after = " + ".join(c.upper() for c in crash[0]["after"])
        k = crash[0].get("write", k)
        where = f"the checker killed its process right after its write #{k} ({after})"
        later = [f"#{c['write'] - prev['write']} ({' + '.join(x.upper() for x in c['after'])})"
                 for prev, c in zip(crash, crash[1:], strict=False)]
        if later:  # its redeliveries, duplicates once a run had written, were killed too
            where += (", then the processes running its redeliveries right after their own "
                      f"write {' and '.join(later)}")
        where += ", as the OOM killer could between any two writes"
        tried.append(f"#{k} ({after})")
        runs_h = len(runs.started(sent[label][0].id))
        if held(label) == 0 and runs_h < 2:
            did, question = _fate(sent[label][0], runs, killed.get(label), ignored, label)
            raise LabCheckFailed(f"{job} was lost: {where}, and {did}. {question} {yours}")
        if held(label) == 0:
            raise LabCheckFailed(
                f"{job} was lost: {where}. {job} ran again and was not credited: what the "
                f"first run wrote made the second run believe {job} was already applied. What "
                f"does your code leave behind when it dies between two of its writes? {yours}")
        if held(label) > want and held(label) % want == 0:  # credited 2, 3 ... times
            times = {2: "twice"}.get(held(label) // want, f"{held(label) // want} times")
            raise LabCheckFailed(
                f"acct-{label} holds {held(label)}, expected {want}: {job} was credited {times}. "
                f"{where[0].upper()}{where[1:]}; {job} ran again and was credited again: what a "
                "killed run wrote did not let the next run recognise the payment, or undo what it "
                "did. What does your code leave behind when it dies between two of its writes, "
                f"in a first run and in a duplicate's? {yours}")
        if wrong(label):
            raise LabCheckFailed(
                f"acct-{label} holds {held(label)}, expected {want}: {where[0].upper()}"
                f"{where[1:]}, and {job} was not applied exactly once after that. {yours}")
    more = (f" (your payment makes {len(whole)} writes: the checker tried the first "
            f"{MAX_CRASHES} only)") if len(whole) > MAX_CRASHES else ""
    if len(tried) == 1:
        ok(f"a process killed right after its write {tried[0]}: the payment was applied once{more}")
    else:
        ok(f"a process killed right after write {', '.join(tried)}, one payment each: every one "
           f"was applied once{more}")
    print("Lab 4 passed: crash-safe and idempotent.")
