"""Lab 5 checker: retries with backoff, dead letters, and their replay."""

from __future__ import annotations

from celerylab.checks.common import LabCheckFailed, call_learner, checker, ok
from celerylab.errors import CourseError

LAB05_TASK = "lab05_tasks.sync_order"
LAB05_DEAD = "lab05:dead"
LAB05_MAX_CAP = 4  # seconds: the longest wait between attempts this checker sits through


def _lab05_module():
    import importlib
    import sys
    sys.modules.pop("lab05_tasks", None)
    try:
        return importlib.import_module("lab05_tasks")
    except NotImplementedError:
        raise LabCheckFailed("lab05_tasks.py still has a `raise NotImplementedError` line: write "
                             "your policy there, re-run the %%writefile cell, then this check.") \
            from None
    except Exception as exc:
        raise LabCheckFailed(f"lab05_tasks.py does not import: {type(exc).__name__}: {exc}") \
            from None


def _lab05_policy(mod) -> dict:
    task = mod.sync_order
    retry_for = tuple(getattr(task, "autoretry_for", ()) or ())
    policy = {"retry_for": retry_for, "backoff": getattr(task, "retry_backoff", False),
              "cap": getattr(task, "retry_backoff_max", 600),
              "jitter": getattr(task, "retry_jitter", True), "max_retries": task.max_retries}
    if not any(issubclass(mod.DependencyDown, e) for e in retry_for):
        raise LabCheckFailed("DependencyDown is not retried: a dependency that is down for a "
                             "moment should be tried again later (autoretry_for).")
    if any(issubclass(mod.InvalidOrder, e) for e in retry_for):
        raise LabCheckFailed("InvalidOrder would be retried, but a malformed order fails the same "
                             "way every time: retrying only delays its dead letter.")
    if not policy["backoff"]:
        raise LabCheckFailed("No backoff: every retry would wait the same default_retry_delay "
                             "(180 s unless set). Back off exponentially.")
    if policy["cap"] is None or policy["cap"] > LAB05_MAX_CAP:
        raise LabCheckFailed(f"retry_backoff_max is {policy['cap']} s; cap the backoff at "
                             f"{LAB05_MAX_CAP} s or less (this checker will not wait longer, and a "
                             "cap is what keeps a long outage from pushing delays to minutes).")
    if not policy["jitter"]:
        raise LabCheckFailed("retry_jitter is off: every caller that failed together retries "
                             "together, and hammers the dependency in waves.")
    if not isinstance(policy["max_retries"], int) or not 2 <= policy["max_retries"] <= 5:
        raise LabCheckFailed(f"max_retries is {policy['max_retries']!r}: allow 2 to 5 retries "
                             "(None would retry forever).")
    return policy


@checker
def check_lab05(replay_dead_letters, stack) -> None:
    """Lab 5: retries that recover transient failures, dead letters for permanent ones, replay."""
    import json

    r = stack.redis
    stack.reset()
    mod = _lab05_module()
    policy = _lab05_policy(mod)
    factor = int(max(1.0, float(policy["backoff"])))
    bounds = [min(policy["cap"], factor * 2**n) for n in range(policy["max_retries"])]
    ok(f"policy: retry {[e.__name__ for e in policy['retry_for']]}, backoff {factor} s x 2^n "
       f"capped at {policy['cap']} s, jitter, at most {policy['max_retries']} retries")

    r.hset("lab05:faults", mapping={"flaky-1": "down", "flaky-2": "down", "down-1": "down",
                                    "bad-1": "invalid"})
    r.hset("lab05:failures-left", mapping={"flaky-1": 2, "flaky-2": 2, "down-1": 1000})
    worker = stack.worker("lab05_tasks", name="sync", concurrency=4, prefetch_multiplier=1)
    try:
        worker.start()
        calls = {k: stack.control.send_task(LAB05_TASK, (k,))
                 for k in ("ok-1", "flaky-1", "flaky-2", "down-1", "bad-1")}
        try:
            stack.wait_until(lambda: all(stack.outcome(c.id) for c in calls.values()),
                             sum(bounds) + 10, "every call to succeed or give up")
        except CourseError:
            stuck = [k for k, c in calls.items() if not stack.outcome(c.id)]
            raise LabCheckFailed(f"After {sum(bounds) + 10} s these calls had not finished: "
                                 f"{stuck}.\nThe worker's log ends with:\n{worker.log_tail(15)}") \
                from None
        state = {k: stack.outcome(c.id) for k, c in calls.items()}

        def runs(key):
            return sorted((a for a in stack.records([calls[key].id]) if a.started),
                          key=lambda a: a.started)

        for key in ("ok-1", "flaky-1", "flaky-2"):
            if state[key] != "SUCCESS":
                raise LabCheckFailed(f"{key} failed twice, then would have succeeded, but it "
                                     f"ended in {state[key]}. Transient failures must "
                                     "succeed within the retry budget.")
        for key in ("flaky-1", "flaky-2"):
            attempts = runs(key)
            for n, (a, b) in enumerate(zip(attempts, attempts[1:], strict=False)):
                gap = b.started - a.finished
                if gap > bounds[n] + 0.75:
                    raise LabCheckFailed(f"{key}: retry {n + 1} came {gap:.1f} s after the failure; "
                                         f"your policy allows at most {bounds[n]} s.")
        ok(f"transient failures recovered within the budget; delays within {bounds[:2]} s")

        letters = [json.loads(x) for x in r.lrange(LAB05_DEAD, 0, -1)]
        by_order = {}
        for letter in letters:
            if not isinstance(letter, dict) or {"task", "args", "error", "attempts"} - set(letter):
                raise LabCheckFailed(f"A dead letter must be a JSON dict with task, id, args, "
                                     f"kwargs, error and attempts; found {letter!r}.")
            by_order[(letter["args"] or [None])[0]] = letter
        for key, attempts, exc in (("down-1", policy["max_retries"] + 1, "DependencyDown"),
                                   ("bad-1", 1, "InvalidOrder")):
            if state[key] != "FAILURE":
                raise LabCheckFailed(f"{key} should have failed for good; it ended {state[key]}.")
            letter = by_order.get(key)
            if letter is None:
                raise LabCheckFailed(f"{key} failed for good but is not in the dead-letter list "
                                     f"{LAB05_DEAD!r}. What runs once a task has failed for good?")
            if exc not in letter["error"]:
                raise LabCheckFailed(f"The dead letter of {key} says {letter['error']!r}; it "
                                     f"should name the error ({exc}).")
            if letter["attempts"] != attempts or len(runs(key)) != attempts:
                raise LabCheckFailed(f"{key} ran {len(runs(key))} times and its dead letter says "
                                     f"{letter['attempts']}; expected {attempts}.")
        if set(by_order) != {"down-1", "bad-1"}:
            raise LabCheckFailed(f"Only down-1 and bad-1 belong in the dead-letter list; found "
                                 f"{sorted(map(str, by_order))}.")
        ok("the outage and the malformed order are dead letters, with payload, error, attempts")

        r.delete("lab05:faults", "lab05:failures-left")  # the causes are fixed
        replayed = call_learner(replay_dead_letters, r, stack.control.send_task,
                                what="replay_dead_letters")
        replayed = [stack.control.AsyncResult(x) if isinstance(x, str) else x
                    for x in replayed or []]
        if len(replayed) != 2:
            raise LabCheckFailed(f"replay_dead_letters re-sent {len(replayed)} messages; the "
                                 "dead-letter list held 2.")
        stack.wait_until(lambda: all(x.state in ("SUCCESS", "FAILURE") for x in replayed), 15,
                         "the replayed tasks")
        if [x.state for x in replayed] != ["SUCCESS", "SUCCESS"] or r.llen(LAB05_DEAD):
            raise LabCheckFailed("After the fix, the replayed tasks should succeed and the "
                                 f"dead-letter list be empty (states {[x.state for x in replayed]},"
                                 f" {r.llen(LAB05_DEAD)} letters left).")
        ok("after the fix, the replay succeeded and emptied the dead-letter list")
    finally:
        stack.stop_workers()
    print("Lab 5 passed: transient failures retried with backoff, permanent ones parked and "
          "replayed.")
