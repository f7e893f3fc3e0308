"""Lab 10 checker: the learner's order workflow (``lab10_tasks``: the steps, ``workflow``,
``place_order``, ``sweep``) through failures, on a real worker (4 pool processes).

The partners (bank, warehouse, mail) are the lab's given functions: each makes its effect once
per idempotency key (one Lua script), notes its calls in ``lab10:calls``, then answers, slowly
the first time when ``lab10:slow`` says so; ``lab10:faults`` makes them fail. The effects are
counted in ``bank:charges``, ``shipments`` and ``receipts``; the team's view is
``failed_orders``. In order:

1. **Side by side.** ``expired`` first: once both its (slow) items ship, its chord's state
   (``celery-taskset-meta-<group>.*``, the only chord in flight then) is deleted, so its body can
   never run. (An answer that joins without a chord keeps no such state: then it must simply
   finish.) Then ``ok-1`` (the reference), ``declined`` (refused for good), ``timeout-after``
   (charged, then no answer, once), ``timeout-before`` (no answer and no charge, once: a timeout
   taken for a success ships an unpaid order) and ``nostock`` (one item cannot ship, for good).
   Judged once the broker is empty and every task started since has finished.
2. **One SIGKILL** of the whole worker while ``crash-receipt``'s receipt, ``crash-chord``'s lamp
   and ``crash-chain``'s charge give their slow answers (their effects made). The unacknowledged
   messages are aged as if the visibility timeout had passed (``capstone.age_unacked``, as lab 4)
   and the worker restarted: each must finish, with one receipt, one shipment per item, one
   charge (a key that changes per attempt repeats the effect). A lost step (early
   acknowledgement) shows as soon as nothing is left to run.
3. **The sweep.** ``young`` is placed and, once its slow charge is under way,
   ``sweep(stuck_after)`` is called with ``stuck_after`` half ``expired``'s age (a few seconds):
   ``expired`` must be recorded, ``young`` must not; ``declined`` and ``nostock`` must be recorded
   by now (an error callback or the sweep); no order that got its receipt may be.

Every wait ends early when nothing is left to run; the learner's calls are bounded in time and
guarded (a stub, a crash or a hang gives a hint). Verdicts are counts, never times.
"""

from __future__ import annotations

import gc
import json
import time

from celerylab import recording
from celerylab.capstone import age_unacked
from celerylab.checks.common import LabCheckFailed, call_within, checker, import_answer, ok

MODULE = "lab10_tasks"
ITEMS = ["book", "lamp"]
FAULTS = {"declined": "declined", "timeout-after": "timeout-after",
          "timeout-before": "timeout-before", "nostock": "out-of-stock:lamp"}
SLOW = {"expired:ship-book": 1.0, "expired:ship-lamp": 1.0, "crash-receipt:receipt": 3.0,
        "crash-chord:ship-lamp": 3.0, "crash-chain:charge": 3.0, "young:charge": 3.0}
# s between crash-chord's book (shipped at once) and the SIGKILL mid-lamp: a chord whose state
# expires within a gap like this between two header returns loses the order (chapter 10)
CHORD_GAP = 1.5
SETTLE = 20.0  # s: everything here normally settles within a few seconds
QUIET_FOR = 0.6  # s the broker must stay empty, with nothing running, to call a phase over
CALL_WITHIN = 10.0  # s for place_order or sweep to return
MIN_STUCK_AFTER = 2.0  # s: the smallest stuck_after the sweep is given
NAMES = ("place_order", "sweep", "workflow")
# the lists the course, kombu and the given code keep; any other list is a queue
KNOWN_LISTS = {"celery", "lab10:calls", recording.EVENTS}


def _module():
    """The learner's task module, with the functions the check calls."""
    module = import_answer(MODULE)
    missing = [n for n in NAMES if not callable(getattr(module, n, None))]
    if missing:
        raise LabCheckFailed(f"lab10_tasks.py has no {', '.join(missing)}: keep the functions the "
                             "lab's cell defines, with their names.")
    return module


class _Shop:
    """What the check reads: the partners' counts and the team's view, per order."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.db = stack.redis

    def _count(self, key: str, field: str) -> int:
        return int(self.db.hget(key, field) or 0)

    def charges(self, order: str) -> int:
        return self._count("bank:charges", order)

    def shipped(self, order: str, item: str) -> int:
        return self._count("shipments", f"{order}:{item}")

    def receipts(self, order: str) -> int:
        return self._count("receipts", order)

    def failed(self) -> dict[str, str]:
        return {k.decode(): v.decode(errors="replace")
                for k, v in self.db.hgetall("failed_orders").items()}

    def calls(self, what: str, order: str) -> int:
        return self.db.lrange("lab10:calls", 0, -1).count(f"{what}:{order}".encode())

    def elsewhere(self) -> dict[str, int]:
        """Messages waiting in lists the check's worker does not consume (other queues)."""
        return {k.decode(): self.db.llen(k) for k in self.db.scan_iter(_type="list")
                if k.decode() not in KNOWN_LISTS and not k.startswith(b"celerylab:")}

    def quiet(self, since: float) -> bool:
        """Nothing waits in the worker's queue or is held, and every task started since ``since``
        has finished (earlier ones may have died with a worker)."""
        if self.db.llen("celery") or self.db.hlen("unacked"):
            return False
        latest: dict[str, recording.Attempt] = {}
        for a in self.stack.records():
            if (a.started or 0) >= since and (a.id not in latest
                                              or a.started >= latest[a.id].started):
                latest[a.id] = a
        return all(a.finished is not None for a in latest.values())

    def wait(self, done, since: float, what: str) -> bool:
        """Wait until ``done()``, or until nothing has been left to run for QUIET_FOR (it never
        will be done then), or SETTLE. Returns whether it is done."""
        deadline, quiet_since = time.monotonic() + SETTLE, None
        while time.monotonic() < deadline:
            if done():
                return True
            if self.quiet(since):
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= QUIET_FOR:
                    return bool(done())
            else:
                quiet_since = None
            time.sleep(0.05)
        raise LabCheckFailed(f"Waited {SETTLE:.0f} s for {what}, and tasks were still running or "
                             "waiting: does a step retry forever, or minutes from now (a retry's "
                             "default delay is 3 minutes), or wait for another task's result? "
                             "The worker's log: stack.worker_log(\"lab10\").")


def _place(tasks, order: str) -> None:
    try:
        call_within(tasks.place_order, order, list(ITEMS), what=f"place_order({order!r}, ...)",
                    limit=CALL_WITHIN)
    except LabCheckFailed as exc:
        if "raised" in str(exc) and any(name in str(exc) for name in (
                "Declined", "GatewayTimeout", "OutOfStock", "ChordError", "TimeoutError")):
            raise LabCheckFailed(f"place_order({order!r}, ...) raised what a step of the workflow "
                                 "raises: it ran or waited for the workflow itself. The request "
                                 "path only sends it, and returns.") from None
        raise


def _finished_once(shop: _Shop, order: str, what: str = "") -> None:
    """An order that can finish: charged once, each item shipped once, one receipt."""
    charges, receipts = shop.charges(order), shop.receipts(order)
    shipped = {item: shop.shipped(order, item) for item in ITEMS}
    if charges > 1:
        raise LabCheckFailed(f"{order} was charged {charges} times{what}. Each attempt of your "
                             "charge asked the bank anew: what does the bank need to recognise "
                             "that it already charged this order?")
    for item, n in shipped.items():
        if n > 1:
            raise LabCheckFailed(f"{order}'s {item} was shipped {n} times{what}: a shipment ran "
                                 "again and the warehouse did not recognise it.")
    if receipts > 1:
        raise LabCheckFailed(f"{order} got {receipts} receipts{what}: the receipt step ran again "
                             "and the mail did not recognise it.")
    if receipts and not all(shipped.values()):
        raise LabCheckFailed(f"{order} got a receipt, but its {', '.join(i for i, n in shipped.items() if not n)} "
                             f"never shipped{what}: the receipt went out before, or without, "
                             "every shipment.")
    if (receipts or any(shipped.values())) and not charges:
        raise LabCheckFailed(f"{order} shipped without being charged{what}: a step that did not "
                             "get the bank's answer went on as if it had.")
    if not (receipts and charges and all(shipped.values())):
        raise LabCheckFailed(
            f"{order} never finished{what} (charged {charges}, shipped "
            f"{list(shipped.values())}, receipts {receipts}), and nothing is left to run for "
            f"it. {_why_unfinished(shop, order)}")


def _why_unfinished(shop: _Shop, order: str) -> str:
    waiting = shop.elsewhere()
    if waiting:
        return (f"Messages wait in {', '.join(f'{q!r} ({n})' for q, n in waiting.items())}, "
                "which the check's worker does not consume: it consumes `celery`.")
    step = {"crash-chain": "charge", "crash-chord": "ship-lamp", "crash-receipt": "receipt"}
    if order in step and shop.calls(step[order], order) >= 2:
        return ("The step the crash interrupted ran again, and yet the order went no further: "
                "what else did the crash and the restart cost it? (A chord's state has an "
                "expiry.)")
    return {
        "ok-1": "Nothing went wrong with this order: place one by hand and read the worker's "
                "log (stack.worker_log(\"lab10\")).",
        "timeout-after": "The bank timed out once; asked again, it would have answered. What "
                         "does your charge do with a GatewayTimeout?",
        "timeout-before": "The bank timed out once; asked again, it would have answered. What "
                          "does your charge do with a GatewayTimeout?",
        "crash-chain": "Its charge was running when the worker was killed, and never ran again. "
                       "What becomes of a running step's message when its worker dies?",
        "crash-chord": "One of its items was shipping when the worker was killed, and never "
                       "shipped again. What becomes of a running step's message when its worker "
                       "dies?",
        "expired": "Your workflow kept no chord state to delete, so this order should have "
                   "finished.",
    }.get(order, "")


def _crash(stack, worker, shop: _Shop, tasks) -> None:
    """crash-receipt, crash-chord and crash-chain each in a slow answer, then one SIGKILL; the
    dead worker's messages aged, the worker restarted."""
    since = time.time()
    for order, started in (("crash-chord", lambda: shop.shipped("crash-chord", "lamp")),
                           ("crash-receipt", lambda: shop.receipts("crash-receipt")),
                           ("crash-chain", lambda: shop.charges("crash-chain"))):
        _place(tasks, order)
        if not shop.wait(started, since, f"{order} to reach its slow step"):
            _finished_once(shop, order, " (before any crash)")
        if order == "crash-chord":
            lamp_started = time.time()
    stack.wait_until(lambda: time.time() - lamp_started >= CHORD_GAP, CHORD_GAP + 1,
                     "the gap before the crash")
    worker.kill()
    ids = set()
    for raw in shop.db.hvals("unacked"):
        try:
            msg = json.loads(raw)
            ids.add(str((msg[0] if isinstance(msg, list) else msg)["headers"]["id"]))
        except (ValueError, KeyError, TypeError, IndexError):
            continue
    aged = age_unacked(shop.db, ids)
    worker.start()
    print(f"  ..  worker SIGKILLed mid-receipt, mid-shipment and mid-charge ({aged} message(s) "
          "held unacknowledged, aged as if an hour had passed); restarted")


@checker
def check_lab10(stack) -> None:
    """Run the learner's workflow through the faults above; print what passed, or raise a hint."""
    try:
        _judge(stack, _module())
    finally:
        gc.collect()  # the answer's AsyncResults unsubscribe now, while this Redis is up


def _judge(stack, tasks) -> None:
    stack.reset()  # a clean shop: no keys, counts or orders from an earlier run
    db = stack.redis
    db.hset("lab10:faults", mapping=FAULTS)
    db.hset("lab10:slow", mapping=SLOW)
    shop = _Shop(stack)
    worker = stack.spawn_worker(MODULE, name="lab10", concurrency=4, prefetch_multiplier=1)
    print(f"worker {worker.hostname} up (4 pool processes); ten orders to go")

    # 1. side by side: a chord's state lost, the reference, and failures that need no crash ---
    since = time.time()
    _place(tasks, "expired")
    shop.wait(lambda: shop.calls("ship-book", "expired") and shop.calls("ship-lamp", "expired"),
              since, "expired's items to ship")
    lost = [k for k in db.scan_iter("celery-taskset-meta-*") if not k.endswith(b".c")]
    for key in lost:
        db.delete(key)
    together = ("ok-1", "declined", "timeout-after", "timeout-before", "nostock")
    for order in together:
        _place(tasks, order)
    finishing = ("ok-1", "timeout-after", "timeout-before")
    shop.wait(lambda: all(shop.receipts(o) for o in finishing) and shop.quiet(since), since,
              "the first six orders")
    _finished_once(shop, "ok-1")
    ok("ok-1: charged once, both items shipped, one receipt")
    if shop.receipts("declined") or any(shop.shipped("declined", i) for i in ITEMS):
        raise LabCheckFailed("declined's card was refused, and yet it shipped or got a receipt: "
                             "the steps after a refused charge still ran. A step that fails for "
                             "good must end the workflow, not hand the next step a value.")
    ok("declined: nothing shipped, no receipt")
    _finished_once(shop, "timeout-after", " after the bank charged it and then timed out")
    _finished_once(shop, "timeout-before", " after the bank timed out before charging it")
    ok("timeout-after and timeout-before: finished after the bank's timeout, charged once")
    if shop.receipts("nostock"):
        raise LabCheckFailed("nostock got a receipt, but its lamp never shipped (out of stock): "
                             "the receipt went out without every shipment having succeeded.")
    ok("nostock: no receipt for an order that did not ship in full")
    if lost and shop.receipts("expired"):
        raise LabCheckFailed("expired got a receipt although its chord's state was deleted "
                             "before its items had shipped: does the receipt wait for the "
                             "shipments?")
    if not lost:
        _finished_once(shop, "expired")

    # 2. one SIGKILL mid-receipt, mid-shipment and mid-charge ------------------------------------
    _crash(stack, worker, shop, tasks)
    restarted = time.time()
    crashed = ("crash-receipt", "crash-chord", "crash-chain")
    shop.wait(lambda: all(shop.receipts(o) for o in crashed) and shop.quiet(restarted),
              restarted, "the crashed orders to finish")
    _finished_once(shop, "crash-receipt", " after the worker was killed while it was sent")
    _finished_once(shop, "crash-chord", " after the worker was killed mid-shipment")
    _finished_once(shop, "crash-chain", " after the worker was killed mid-charge")
    ok("crash-receipt, crash-chord, crash-chain: finished after the SIGKILL, one receipt, each "
       "item shipped once, charged once")

    # 3. the sweep --------------------------------------------------------------------------------
    # expired at least 4 s old, so that stuck_after (half its age) tells it from young even on a
    # clock of whole seconds
    stack.wait_until(lambda: time.time() - since >= 2 * MIN_STUCK_AFTER, 2 * MIN_STUCK_AFTER + 1,
                     "expired to age")
    placed = time.time()
    _place(tasks, "young")
    shop.wait(lambda: shop.calls("charge", "young"), placed, "young's charge to start")
    stuck_after = round((time.time() - since) / 2, 1)  # expired is twice as old; young far younger
    found = call_within(tasks.sweep, stuck_after, what=f"sweep({stuck_after})", limit=CALL_WITHIN)
    failed = shop.failed()
    if "young" in failed:
        raise LabCheckFailed(f"sweep({stuck_after}) recorded young, placed "
                             f"{time.time() - placed:.1f} s before and still running: an order "
                             "is stuck only once it is older than stuck_after (and its age "
                             "needs a clock finer than whole seconds).")
    receipted = [o for o in failed if shop.receipts(o)]
    if receipted:
        raise LabCheckFailed(f"{receipted[0]} got its receipt and yet is in failed_orders: the "
                             "team would chase an order that is fine.")
    for order, why in (("declined", "the bank refused its card"),
                       ("nostock", "one of its items is out of stock")):
        if order not in failed:
            raise LabCheckFailed(f"{order} cannot finish ({why}), and it is not in "
                                 f"failed_orders, even after sweep() (which returned "
                                 f"{found!r:.80}): the team never hears of it.")
    ok("declined and nostock: recorded in failed_orders")
    if lost and "expired" not in failed:
        raise LabCheckFailed(f"expired's chord state was deleted, so its receipt can never be "
                             f"sent, and sweep({stuck_after}) did not record it (it returned "
                             f"{found!r:.80}; expired was placed {time.time() - since:.1f} s "
                             "before). No error callback is ever called for it: what finds it?")
    if lost:
        ok(f"expired: its chord's state deleted; sweep({stuck_after}) recorded it "
           f"(it returned {found!r:.60})")
    else:
        ok("expired: your workflow keeps no chord state in the result backend; it finished")
    ok("young: still running, not recorded")
    worker.kill()  # young is still being charged: the next check starts from a clean shop
    print("Lab 10 passed: charged once, shipped once, no receipt without every shipment, "
          "crashes recovered, and every order that cannot finish recorded.")
