"""Lab 5 checker: a retry policy measured on the live stack, dead letters, and their replay.

What is judged is what happens, not what the policy says: the waits between attempts are measured
from the recording and compared with the bounds the declared policy implies, their growth and
their spread across orders; the replay is judged by the messages it publishes and by what runs
after it. Only what cannot be measured within the time a check may take (a cap above 4 s, a retry
budget out of range) is judged from the task's declared options, and that fails fast.

How Celery computes an autoretry delay (celery/app/autoretry.py, celery/utils/time.py)::

    factor = int(max(1.0, retry_backoff))          # whole seconds: 0.5 -> 1, 1.5 -> 1
    delay  = min(retry_backoff_max, factor * 2**n)  # n = retries so far
    delay  = random.randrange(delay + 1)            # retry_jitter: a whole number, 0..delay

so every measured wait is a whole number of seconds plus a dispatch overhead, which the checker
measures in the same run (the wait of the first attempts, published with no delay).
"""

from __future__ import annotations

import json
import math
import time

from celerylab.checks.common import LabCheckFailed, MachineTooBusy, call_learner, checker, ok

LAB05_TASK = "lab05_tasks.sync_order"
LAB05_DEAD = "lab05:dead"
LAB05_MAX_CAP = 4  # seconds: the longest wait between attempts the lab allows
LETTER_KEYS = ("task", "id", "args", "kwargs", "error", "attempts")
LETTER_TIMEOUT = 10.0  # s for a dead letter to appear after its task failed for good (errbacks lag)
POLL = 0.2  # s between reads of the recording (each read parses the whole event list)

# Celery's delays are whole seconds: two waits one step apart differ by ~1 s. Half a step tells
# them apart while the dispatch overhead stays well below it; the reference decides whether it does.
HALF_STEP = 0.5
TOO_BUSY = 0.4  # s: a reference overhead this large could blur a whole-second step
UPPER_ALLOWANCE = 0.5  # s, on top of the measured reference overhead, for the upper bound

# How many orders retry at once. A jittered policy draws each wait uniformly from the whole
# seconds in [0, b_n], b_n = min(cap, factor * 2**n), independently per order and retry:
# * lockstep (every order drawing the same wait at every retry number) has probability
#   prod_n (b_n + 1) ** (1 - N); the least spread valid policy (factor 1, cap 2, 2 retries:
#   b = 1, 2) gives 6 ** (1 - N), 2.8e-9 for N = 12;
# * growth goes unseen when no order draws a wait above the first step at any later retry:
#   q ** N with q = prod_{n>=1} (b_0 + 1) / (b_n + 1); N is chosen so that q ** N <= 1e-5
#   (factor 1, cap 2, 3 retries: q = 4/9, N = 15; factor 2, cap 4, 2 retries: q = 3/5, N = 23;
#   the extreme factor 3, cap 4, 2 retries: q = 4/5, N = 52). A Monte Carlo run of
#   _judge_policy over these policies (100,000 draws each, at 1e-4) matched the formula.
MIN_ORDERS, MAX_ORDERS, MISS = 12, 52, 1e-5


def _lab05_module():
    import importlib
    import sys
    sys.modules.pop("lab05_tasks", None)
    try:
        mod = importlib.import_module("lab05_tasks")
    except NotImplementedError:
        raise LabCheckFailed("lab05_tasks.py still has a `raise NotImplementedError` line: write "
                             "your policy there, re-run the %%writefile cell, then this check.") \
            from None
    except Exception as exc:
        raise LabCheckFailed(f"lab05_tasks.py does not import: {type(exc).__name__}: {exc}") \
            from None
    missing = [n for n in ("sync_order", "DependencyDown", "InvalidOrder") if not hasattr(mod, n)]
    if missing:
        raise LabCheckFailed(f"lab05_tasks.py has no {', '.join(missing)}: keep the given code of "
                             "the task module and add your parts.")
    return mod


def _declared_waits(task) -> tuple[list[float], list[float], bool]:
    """The waits before retry n = 0, 1, ... that the task's options imply, as Celery computes
    them (autoretry.py, Task.retry): (lowest, highest, jittered)."""
    mr = task.max_retries
    if isinstance(mr, bool) or not isinstance(mr, int) or not 2 <= mr <= 5:
        raise LabCheckFailed(f"The task's retry budget is max_retries={mr!r}: allow 2 to 5 "
                             "retries (None retries forever, 1 hardly rides out an outage).")
    try:
        backoff = float(getattr(task, "retry_backoff", False) or 0)
        cap = int(getattr(task, "retry_backoff_max", 600))
        jitter = bool(getattr(task, "retry_jitter", True))
        if backoff:
            factor = int(max(1.0, backoff))
            high = [float(min(cap, factor * 2**n)) for n in range(mr)]
            longest = float(cap)  # what a longer outage (or a larger max_retries) would reach
            low = [0.0] * mr if jitter else list(high)
        else:  # no backoff: retry_kwargs' countdown, else default_retry_delay (Task.retry)
            jitter = False
            countdown = dict(getattr(task, "retry_kwargs", None) or {}).get("countdown")
            if countdown is None:
                countdown = task.default_retry_delay
            high = low = [float(countdown or 0)] * mr
            longest = high[0]
    except (TypeError, ValueError) as exc:
        raise LabCheckFailed(f"The task's retry options cannot be read as numbers: {exc}") from None
    if longest > LAB05_MAX_CAP:
        raise LabCheckFailed(
            f"Your policy lets the wait between two attempts reach {longest:g} s, longer than the "
            f"{LAB05_MAX_CAP} s this lab allows: a long outage would push retries minutes apart "
            "(and this check will not sit through that). The policy is read from the options "
            "the task is declared with (POLICY); with no backoff declared, Celery waits its "
            "default retry delay.")
    return low, high, jitter


def _orders_needed(high: list[float], jitter: bool) -> int:
    """N (see MIN_ORDERS): enough orders that a right policy shows its growth (q ** N <= MISS)."""
    if not jitter:
        return MIN_ORDERS  # no randomness: growth, if any, shows in every order
    q = math.prod(min(1.0, (high[0] + 1) / (b + 1)) for b in high[1:])
    if q >= 1.0:
        return MIN_ORDERS  # the policy does not claim growth: no sample size would show it
    return max(MIN_ORDERS, min(MAX_ORDERS, math.ceil(math.log(MISS) / math.log(q))))


class _Run:
    """The calls the checker sent, and one read of the recording for all of them."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.calls: dict[str, dict] = {}  # order id -> {"id", "args", "kwargs"}

    def send(self, order: str, args: tuple, kwargs: dict) -> str:
        res = self.stack.control.send_task(LAB05_TASK, args, kwargs)
        self.calls[order] = {"id": res.id, "args": list(args), "kwargs": dict(kwargs)}
        return res.id

    def attempts(self, orders, since: float | None = None) -> dict[str, list]:
        """Started attempts per order, oldest first (only those published after ``since``)."""
        ids = {self.calls[o]["id"]: o for o in orders}
        out: dict[str, list] = {o: [] for o in orders}
        for a in self.stack.records(list(ids)):
            if a.started is not None and (since is None or (a.sent or 0) >= since):
                out[ids[a.id]].append(a)
        for runs in out.values():
            runs.sort(key=lambda a: a.started)
        return out

    def wait_done(self, orders, timeout: float, max_attempts: int | None = None) -> dict:
        """Wait until every order has ended (an attempt finished SUCCESS or FAILURE)."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.attempts(orders)
            pending = [o for o in orders if not _outcome(runs[o])]
            if not pending:
                return runs
            looping = [o for o in pending if max_attempts and len(runs[o]) > max_attempts + 1]
            if looping:
                raise LabCheckFailed(
                    f"{looping[0]} has run {len(runs[looping[0]])} times and is still going, more "
                    f"than the {max_attempts} attempts your policy allows: after its process "
                    "died it was delivered again and again (a poison message).")
            if time.monotonic() > deadline:
                raise LabCheckFailed(
                    f"After {timeout:.0f} s these orders had not finished: {pending[:6]}"
                    f"{' ...' if len(pending) > 6 else ''} (attempts so far: "
                    f"{[len(runs[o]) for o in pending[:6]]}). Their retries wait longer than the "
                    "policy you declared implies, or never come.")
            time.sleep(POLL)


def _outcome(runs) -> str | None:
    """SUCCESS, FAILURE (an exception, or a killed pool child recorded as LOST), or None."""
    states = {a.state for a in runs}
    return "SUCCESS" if "SUCCESS" in states else "FAILURE" if states & {"FAILURE", "LOST"} \
        else None


def _find_letters(r, order: str, task_id: str) -> list[str]:
    """The raw dead letters that mention this order or task id, waiting for one to appear."""
    deadline = time.monotonic() + LETTER_TIMEOUT
    while True:
        found = [text for text in (raw.decode(errors="replace")
                                   for raw in r.lrange(LAB05_DEAD, 0, -1))
                 if task_id in text or f'"{order}"' in text]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(POLL)


def _parse_letter(text: str):
    try:
        letter = json.loads(text)
    except ValueError:
        raise LabCheckFailed(f"An item of the list {LAB05_DEAD!r} is not JSON: {text[:120]!r}. "
                             "Each dead letter is one JSON object (json.dumps of a dict).") \
            from None
    if not isinstance(letter, dict):
        raise LabCheckFailed(f"A dead letter should be a JSON object (a dict); found "
                             f"{type(letter).__name__}: {text[:120]!r}.")
    missing = [k for k in LETTER_KEYS if k not in letter]
    if missing:
        raise LabCheckFailed(f"A dead letter has no {', '.join(missing)}: found the keys "
                             f"{sorted(letter)}; the lab asks for {', '.join(LETTER_KEYS)}.")
    return letter


def _check_letter(r, run: _Run, order: str, runs: list, exc: str, missing: str = "") -> dict:
    call = run.calls[order]
    texts = _find_letters(r, order, call["id"])
    if not texts:
        raise LabCheckFailed(
            f"{order} failed for good ({exc}, after {len(runs)} attempt(s)), but no dead letter "
            f"appeared on the Redis list {LAB05_DEAD!r} within {LETTER_TIMEOUT:.0f} s. "
            + (missing or "What runs once a task has failed for good?"))
    letters = [_parse_letter(text) for text in texts]
    # several letters for one task: judge the one written when it failed for good (the final
    # count of letters catches the others)
    letter = next((x for x in letters if x["attempts"] == len(runs)), letters[0])
    wrong = []
    if letter["task"] != LAB05_TASK:
        wrong.append(f"task {letter['task']!r} (the task is {LAB05_TASK!r})")
    if letter["id"] != call["id"]:
        wrong.append(f"id {letter['id']!r} (the task's id was {call['id']!r})")
    if letter["args"] != call["args"] or letter["kwargs"] != call["kwargs"]:
        wrong.append(f"args {letter['args']!r} and kwargs {letter['kwargs']!r} (it was sent with "
                     f"args {call['args']!r} and kwargs {call['kwargs']!r})")
    if not isinstance(letter["error"], str) or exc not in letter["error"]:
        wrong.append(f"error {letter['error']!r} (it should name the error, {exc})")
    if letter["attempts"] != len(runs):
        wrong.append(f"attempts {letter['attempts']!r} (it ran {len(runs)} "
                     f"time{'s' * (len(runs) != 1)})")
    if wrong:
        raise LabCheckFailed(f"The dead letter of {order} says " + "; ".join(wrong) + ".")
    return letter


def _waits(runs: list) -> list[float]:
    """Seconds each retry waited: from its publish (recorded inside the attempt that failed,
    just before that attempt finishes) to its start. Measured from the publish rather than from
    the failed attempt's end, because a 0 s retry can start before the failed attempt has
    finished recording itself (a negative gap)."""
    return [b.started - b.sent if b.sent is not None else b.started - a.finished
            for a, b in zip(runs, runs[1:], strict=False)]


def _judge_policy(waits: dict[str, list[float]], low, high, reference: float) -> None:
    """Bounds, growth and spread of the measured waits (``waits[order][n]`` before retry n+1)."""
    slack = reference + UPPER_ALLOWANCE
    for order, ws in waits.items():
        for n, w in enumerate(ws):
            if w > high[n] + slack:
                raise LabCheckFailed(
                    f"Retry {n + 1} of {order} waited {w:.1f} s; the policy you declared allows "
                    f"at most {high[n]:g} s there (measured overhead on this machine right now: "
                    f"{reference:.2f} s).")
            if w < low[n] - 0.1:
                raise LabCheckFailed(
                    f"Retry {n + 1} of {order} waited only {w:.1f} s; the policy you declared "
                    f"waits {low[n]:g} s there.")
    orders = list(waits)
    by_retry = [[waits[o][n] for o in orders] for n in range(len(high))]
    # the first step: what the first retries waited, or what the policy declares for them if
    # more (a constant 0-or-1 s policy whose first retries all drew 0 must not look like growth)
    first = max(*by_retry[0], high[0])
    later = max(w for ws in by_retry[1:] for w in ws)
    if later < first + HALF_STEP:
        raise LabCheckFailed(
            f"The waits between attempts did not grow: over {len(orders)} orders, the longest wait "
            f"before any later retry ({later:.1f} s) was no longer than the first step "
            f"({first:.1f} s). A dependency that stays down is retried at the same "
            "pace, however long the outage.")
    spreads = [max(ws) - min(ws) for ws in by_retry]
    if all(s < HALF_STEP for s in spreads):
        pattern = ", ".join(f"retry {n + 1}: {min(ws):.1f}-{max(ws):.1f} s"
                            for n, ws in enumerate(by_retry))
        raise LabCheckFailed(
            f"{len(orders)} orders that failed together retried in lockstep: at each retry they "
            f"all waited the same time ({pattern}). When the dependency comes back, it is hit by "
            "every caller at the same instant.")


def _judge_replay(returned, captured: list[dict], expected: list[tuple[str, dict]]) -> None:
    if not isinstance(returned, (list, tuple)):
        raise LabCheckFailed(
            f"replay_dead_letters returned {type(returned).__name__} ({returned!r:.80}); the lab "
            "asks for a list with the result of each message it sent, in the order it sent them.")
    ids = []
    for item in returned:
        item_id = item if isinstance(item, str) else getattr(item, "id", None)
        if not isinstance(item_id, str):
            raise LabCheckFailed(
                f"replay_dead_letters returned a list holding {type(item).__name__} "
                f"({item!r:.60}); each item should be the result of a message it sent (what "
                "send_task returns), or its task id.")
        ids.append(item_id)
    if not captured:
        raise LabCheckFailed(
            f"replay_dead_letters published no message (the list held {len(expected)} dead "
            "letters). Re-send each one with the send_task it is given.")
    if sorted(ids) != sorted(m["id"] for m in captured):
        raise LabCheckFailed(
            f"replay_dead_letters sent {len(captured)} messages but returned {len(ids)} results "
            "that are not theirs: return the result of each message it sends.")
    if ids != [m["id"] for m in captured]:
        raise LabCheckFailed("replay_dead_letters returned the results of the messages it sent, "
                             "but not in the order it sent them.")
    want = [(LAB05_TASK, call["args"], call["kwargs"]) for _, call in expected]
    got = [(m["task"], m["args"], m["kwargs"]) for m in captured]
    if len(got) < len(want) and all(g in want for g in got):
        left_out = [order for (order, _), w in zip(expected, want, strict=True) if w not in got]
        raise LabCheckFailed(
            f"replay_dead_letters sent {len(got)} messages; the dead-letter list held "
            f"{len(want)}: {', '.join(left_out)} {'was' if len(left_out) == 1 else 'were'} not "
            "re-sent. Replay every letter the list holds.")
    for (order, call), payload in zip(expected, want, strict=True):
        if payload not in got:
            same = next((m for m in captured if m["args"][:1] == call["args"][:1]), captured[0])
            raise LabCheckFailed(
                f"The replay changed the payload: {order} died as {LAB05_TASK}(args="
                f"{call['args']!r}, kwargs={call['kwargs']!r}), and the replay sent "
                f"{same['task']}(args={same['args']!r}, kwargs={same['kwargs']!r}).")
    if len(captured) != len(expected):
        raise LabCheckFailed(f"replay_dead_letters sent {len(captured)} messages; the dead-letter "
                             f"list held {len(expected)} letters, one per task that failed for "
                             "good: replay each exactly once.")
    if got != want:
        died = [order for order, _ in expected]
        sent = [next(o for (o, c) in expected if (LAB05_TASK, c["args"], c["kwargs"]) == g)
                for g in got]
        raise LabCheckFailed(f"The replay re-sent the letters in the order {sent}, but they died "
                             f"in the order {died}: replay the oldest first.")


@checker
def check_lab05(replay_dead_letters, stack) -> None:
    """Lab 5: retries that recover transient failures, dead letters for permanent ones, replay."""
    from celery import signals

    r = stack.redis
    stack.reset()
    mod = _lab05_module()
    low, high, jitter = _declared_waits(mod.sync_order)
    mr = len(high)
    n_orders = _orders_needed(high, jitter)
    bounds = ", ".join(f"{lo:g}-{hi:g}" for lo, hi in zip(low, high, strict=True))
    ok(f"declared policy: at most {mr} retries, waiting {bounds} s before each; measuring it on "
       f"{n_orders} orders")

    flaky = [f"flaky-{i}" for i in range(1, n_orders)]
    r.hset("lab05:faults", mapping={"bad-1": "invalid", "bad-2": "invalid", "down-1": "down",
                                    "crash-1": "crash", **{o: "down" for o in flaky}})
    # each flaky order fails as often as the policy retries, so it succeeds on its last attempt;
    # crash-1 too, but its last attempt kills the process running it
    r.hset("lab05:failures-left", mapping={"down-1": 1000, "crash-1": mr,
                                           **{o: mr for o in flaky}})
    run = _Run(stack)
    budget = sum(high) + 20  # the longest the policy may take, plus a generous allowance
    worker = stack.worker("lab05_tasks", name="sync", concurrency=2, prefetch_multiplier=1)
    try:
        worker.start()

        # 1. a malformed order: one attempt, then a dead letter
        run.send("bad-1", ("bad-1", "store-2"), {"express": True})
        runs = run.wait_done(["bad-1"], budget)["bad-1"]
        if len(runs) != 1 or _outcome(runs) != "FAILURE":
            raise LabCheckFailed(
                f"bad-1 is a malformed order (InvalidOrder): it ran {len(runs)} times and ended "
                f"{_outcome(runs)}. Retrying cannot fix it; it only delays its dead letter.")
        _check_letter(r, run, "bad-1", runs, "InvalidOrder")
        ok("a malformed order ran once and became a dead letter with its payload")

        # 2. orders that recover, one that never does, one that needs no retry; the sends are
        #    spread over half a second so that each first attempt measures the dispatch overhead
        plan = [("ok-1", ("ok-1",), {"store": "store-1"}),
                ("down-1", ("down-1", "store-3"), {"express": True}),
                *((o, (o, "store-1"), {}) for o in flaky)]
        for order, args, kwargs in plan:
            run.send(order, args, kwargs)
            time.sleep(0.5 / len(plan))
        orders = [o for o, _, _ in plan]
        runs = run.wait_done(orders, budget)
        for order in ("ok-1", *flaky):
            if _outcome(runs[order]) != "SUCCESS":
                raise LabCheckFailed(
                    f"{order} ended {_outcome(runs[order])} after {len(runs[order])} attempt(s), "
                    f"though its dependency answers again after {mr if order != 'ok-1' else 0} "
                    "failures (DependencyDown): a transient failure should succeed within the "
                    "retry budget.")
        if _outcome(runs["down-1"]) != "FAILURE" or len(runs["down-1"]) != mr + 1:
            raise LabCheckFailed(
                f"down-1 meets a dependency that never comes back; it ran {len(runs['down-1'])} "
                f"times and ended {_outcome(runs['down-1'])}, but the policy you declared allows "
                f"{mr} retries ({mr + 1} attempts) before it gives up.")
        ok(f"{len(flaky)} orders recovered on their last allowed attempt; down-1 gave up after "
           f"{mr + 1} attempts")

        firsts = [runs[o][0] for o in orders] + [run.attempts(["bad-1"])["bad-1"][0]]
        reference = max(a.started - a.sent for a in firsts)
        if reference > TOO_BUSY:
            raise MachineTooBusy(f"tasks sent with no delay waited up to {reference:.2f} s to "
                                 "start, too close to the whole-second steps of a retry policy.")
        # The waits are judged now and told last: a late wait on a busy machine must not hide
        # what the steps below (letters, a killed process, the replay) find whatever the load.
        try:
            _judge_policy({o: _waits(runs[o]) for o in ("down-1", *flaky)}, low, high, reference)
            policy_hint = None
        except LabCheckFailed as exc:
            policy_hint = exc
        _check_letter(r, run, "down-1", runs["down-1"], "DependencyDown")
        ok("the outage became a dead letter after its last attempt")

        # 3. an order whose pool child is killed on its last attempt (as the OOM killer would)
        run.send("crash-1", ("crash-1", "store-5"), {})
        runs_crash = run.wait_done(["crash-1"], budget, max_attempts=mr + 1)["crash-1"]
        if _outcome(runs_crash) != "FAILURE" or len(runs_crash) != mr + 1:
            raise LabCheckFailed(
                f"crash-1 fails {mr} times (DependencyDown), then the process running its last "
                f"attempt is killed; it ran {len(runs_crash)} times and ended "
                f"{_outcome(runs_crash)}, but the policy you declared allows {mr + 1} attempts.")
        _check_letter(r, run, "crash-1", runs_crash, "WorkerLostError", missing=(
            "Its last attempt did not raise: the process running it was killed (SIGKILL, as the "
            "out-of-memory killer does), so nothing ran in that process after it. Who else "
            "learns that the task failed?"))
        ok("a task whose process was killed on its last attempt became a dead letter too")

        # 4. a second malformed order, after the others died: four letters, in a known order
        run.send("bad-2", ("bad-2",), {"store": "store-4", "express": True})
        runs_bad2 = run.wait_done(["bad-2"], budget)["bad-2"]
        _check_letter(r, run, "bad-2", runs_bad2, "InvalidOrder")
        dead = ["bad-1", "down-1", "crash-1", "bad-2"]
        letters = [_parse_letter(x.decode(errors="replace")) for x in r.lrange(LAB05_DEAD, 0, -1)]
        ids = {run.calls[o]["id"]: o for o in run.calls}
        extra = sorted({ids.get(x["id"], str(x["id"])) for x in letters} - set(dead))
        if extra or len(letters) != len(dead):
            raise LabCheckFailed(
                f"The dead-letter list holds {len(letters)} letters; only the {len(dead)} tasks "
                f"that failed for good ({', '.join(dead)}) belong there, once each"
                + (f", but it also has letters for {extra[:5]}, which did not fail for good"
                   if extra else "") + ".")
        ok("four letters, one per task that failed for good: payload, error, attempts")

        # 5. the causes are fixed: replay, and watch what is published and what runs after it
        r.delete("lab05:faults", "lab05:failures-left")
        captured: list[dict] = []

        def capture(sender=None, body=None, headers=None, **_):
            body = body if isinstance(body, (list, tuple)) and len(body) >= 2 else ((), {})
            captured.append({"task": (headers or {}).get("task"), "id": (headers or {}).get("id"),
                             "args": json.loads(json.dumps(list(body[0] or ()), default=str)),
                             "kwargs": json.loads(json.dumps(dict(body[1] or {}), default=str))})

        t_replay = time.time()
        signals.before_task_publish.connect(capture, weak=False)
        try:
            returned = call_learner(replay_dead_letters, r, stack.control.send_task,
                                    what="replay_dead_letters")
        finally:
            signals.before_task_publish.disconnect(capture)
        hint = None
        try:
            _judge_replay(returned, captured, [(o, run.calls[o]) for o in dead])
        except LabCheckFailed as exc:
            hint = str(exc)
        # the learner's results listen on the result backend: let them go now, not with a
        # traceback kept until exit (when they would try to reach a stopped Redis)
        del returned
        if hint:
            raise LabCheckFailed(hint)
        ok("the replay re-sent each letter's task, args and kwargs, oldest first")

        replayed = {f"replay of {o}": {"id": m["id"]} for o, m in zip(dead, captured, strict=True)}
        run.calls.update(replayed)
        deadline = time.monotonic() + 30
        while True:  # only what runs after the replay counts: an old id carries old attempts
            after = run.attempts(replayed, since=t_replay)
            if all(_outcome(v) for v in after.values()) or time.monotonic() > deadline:
                break
            time.sleep(POLL)
        bad = {o: _outcome(v) for o, v in after.items() if _outcome(v) != "SUCCESS"}
        if bad:
            raise LabCheckFailed(f"After the fix, the replayed tasks should run and succeed; "
                                 f"{bad} (None: it never ran within 30 s of the replay).")
        left = r.llen(LAB05_DEAD)
        if left:
            raise LabCheckFailed(f"After the replay, the dead-letter list still holds {left} "
                                 "letters: a replayed letter should leave the list.")
        ok("after the fix, every replayed task ran and succeeded; the dead-letter list is empty")
        if policy_hint is not None:
            raise policy_hint
        ok(f"measured waits stay within the declared bounds (overhead {reference:.2f} s), grow "
           "from retry to retry, and spread across orders (jitter)")
    finally:
        stack.stop_workers()
    print("Lab 5 passed: transient failures retried with growing, jittered waits; permanent "
          "ones parked as dead letters and replayed in order.")
