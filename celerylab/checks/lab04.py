"""Lab 4 checker: every payment applied exactly once through crashes and duplicate sends."""

from __future__ import annotations

from celerylab.checks.common import LabCheckFailed, checker, ok

LAB04_TASK = "lab04_tasks.apply_payment"


def _message_location(r, task_id: str, queue: str = "celery") -> str:
    import json
    if any(json.loads(m)["headers"]["id"] == task_id for m in r.lrange(queue, 0, -1)):
        return "queue"
    if any(json.loads(v)[0]["headers"]["id"] == task_id for v in r.hvals("unacked")):
        return "unacked"
    return "gone"


def _bank_calls(r) -> list[str]:
    return [c.decode() for c in r.lrange("bank:calls", 0, -1)]


@checker
def check_lab04(stack) -> None:
    """Lab 4: every payment applied exactly once through a worker crash and a duplicate send."""
    from celerylab.workers import WorkerError

    r = stack.redis
    stack.reset()
    worker = stack.worker("lab04_tasks", name="payments", concurrency=2, prefetch_multiplier=1)
    try:
        worker.start()
    except WorkerError as exc:
        if "NotImplementedError" in str(exc):
            raise LabCheckFailed("lab04_tasks.py still has a `raise NotImplementedError` line: "
                                 "write your code there, re-run the %%writefile cell, then this "
                                 "check.") from None
        raise LabCheckFailed(f"The worker could not import lab04_tasks.py:\n{exc}") from None
    send = stack.control.send_task
    amounts = {"A": 1000, "B": 2000, "C": 300, "D": 40, "E": 5}

    def pay(k):
        return send(LAB04_TASK, (f"pay-{k}", f"acct-{k}", amounts[k]))

    def reached(call, res):
        def ready():
            if res.state == "FAILURE":
                raise LabCheckFailed(f"apply_payment failed: {res.result!r}. Run it by hand "
                                     "(start a worker, send one payment) to see why.")
            return call in _bank_calls(r)
        return stack.wait_until(ready, 15, f"the bank call {call}")

    try:
        a = pay("A")
        reached("notify:pay-A", a)  # A is credited and in its last, slow call
        b = pay("B")
        reached("authorize:pay-B", b)  # B is in its first call, not credited yet
        worker.kill()
        if _message_location(r, b.id) == "gone":
            raise LabCheckFailed(
                "The worker died while pay-B was in the bank's authorize call, and pay-B's "
                "message is gone from Redis: it will never be applied. When is a message "
                "acknowledged by default, and how do you make that happen later?")
        ok("a crash mid-payment left the payments' messages in Redis")
        worker.start()
        stack.wait_until(lambda: a.state == b.state == "SUCCESS", 25,
                         "pay-A and pay-B to be redelivered and finish")
        rest = [pay("C"), pay("D"), pay("E"), pay("E")]  # E twice: a client retrying its request
        stack.wait_until(lambda: all(x.state in ("SUCCESS", "FAILURE") for x in rest), 20,
                         "the remaining payments")
    finally:
        stack.stop_workers()
    balances = {k: int(r.hget("balances", f"acct-{k}") or 0) for k in amounts}
    print(f"  balances (cents): {balances}")
    if balances["A"] != amounts["A"]:
        raise LabCheckFailed(
            f"acct-A holds {balances['A']}, expected {amounts['A']}. pay-A was credited, then the "
            "worker died before the task returned; its message came back and ran again. How can "
            "the task recognise a payment it has already applied?")
    if balances["E"] != amounts["E"]:
        raise LabCheckFailed(
            f"acct-E holds {balances['E']}, expected {amounts['E']}: the client sent pay-E twice "
            "(same payment id), and it was applied twice. Recognise duplicates by payment id.")
    missing = [k for k in amounts if balances[k] != amounts[k]]
    if missing:
        raise LabCheckFailed(f"Wrong balances for {missing}: expected {amounts}, got {balances}.")
    ok("each payment applied exactly once: through the crash, and when sent twice")
    print("Lab 4 passed: crash-safe and idempotent.")
