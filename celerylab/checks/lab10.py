"""Lab 10 checker: the learner's order workflow (``lab10_tasks``: the steps, ``workflow``,
``place_order``, ``sweep``) through failures, on a real worker (4 pool processes).

The partners (bank, warehouse, mail) are the lab's given functions: each acts once per
idempotency key, notes its calls in ``lab10:calls``, and fails or slows down as the checker writes
in ``lab10:faults`` and ``lab10:slow``. The effects are counted in ``bank:charges``,
``shipments`` and ``receipts``; the team's view is ``failed_orders``. In order:

1. **Side by side**, four orders: ``ok-1`` (nothing wrong: the reference), ``declined`` (the bank
   refuses for good), ``timeout`` (the bank charges, then times out once) and ``nostock`` (one
   item cannot ship, for good). Judged once the broker is empty and every started task has
   finished: ok-1 and timeout finish charged once; declined ships nothing; nostock gets no
   receipt.
2. **A crash**: ``crash-chord`` while an item ships and ``crash-chain`` while the bank answers
   its charge (both effects already made, their answers slow), then one SIGKILL of the whole
   worker. Its unacknowledged messages are aged as if the visibility timeout had passed
   (``capstone.age_unacked``, as lab 4) and the worker restarted: both must finish, charged once,
   each item shipped once. A lost step (early acknowledgement) is caught as soon as nothing is
   left to run.
3. **A lost chord**: ``expired``'s chord state (``celery-taskset-meta-<group>.*``) is deleted while
   its items ship; its body can never run. (An answer that joins without a chord keeps no such
   state: then it must simply finish.) ``young`` is placed, slow, and ``sweep(stuck_after)`` is
   called with ``stuck_after`` between the two orders' ages: expired must be recorded, young must
   not; declined and nostock must be recorded by now (by an error callback or the sweep); no order
   that got its receipt may be recorded.

Every wait ends early when nothing is left to run, and the learner's calls are guarded (a stub
or a crash gives a hint). Budgets are generous: a wrong answer shows as a count, not a time.
"""

from __future__ import annotations

import importlib
import json
import sys
import time

from celerylab import recording
from celerylab.capstone import age_unacked
from celerylab.checks.common import LabCheckFailed, call_learner, checker, ok

MODULE = "lab10_tasks"
ITEMS = ["book", "lamp"]
FAULTS = {"declined": "declined", "timeout": "timeout", "nostock": "out-of-stock:lamp"}
SLOW = {"crash-chain:charge": 2.0, "crash-chord:ship-lamp": 2.0, "expired:ship-book": 1.0,
        "expired:ship-lamp": 1.0, "young:charge": 3.0}
SETTLE = 25.0  # s: everything here normally settles within a few seconds
QUIET_FOR = 0.6  # s the broker must stay empty, with nothing running, to call a phase over
NAMES = ("place_order", "sweep", "workflow")


def _module():
    """The learner's task module, imported afresh (it was rewritten since)."""
    try:
        if MODULE in sys.modules:
            module = importlib.reload(sys.modules[MODULE])
        else:
            module = importlib.import_module(MODULE)
    except NotImplementedError:
        raise LabCheckFailed("lab10_tasks.py is not written yet: fill in its marked places, run "
                             "that cell, then this check again.") from None
    except Exception as exc:
        raise LabCheckFailed(f"lab10_tasks.py does not import: {type(exc).__name__}: {exc}\n"
                             "Run `import lab10_tasks` in a cell to see where it breaks.") from None
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

    def called(self, what: str, order: str) -> bool:
        return f"{what}:{order}".encode() in self.db.lrange("lab10:calls", 0, -1)

    def quiet(self, since: float) -> bool:
        """Nothing waits or is held in the broker, and every task started since ``since`` has
        finished (earlier ones may have died with a worker)."""
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


def _place(tasks, order: str, items=ITEMS) -> None:
    call_learner(tasks.place_order, order, list(items), what=f"place_order({order!r}, ...)")


def _finished_once(shop: _Shop, order: str, what: str) -> None:
    """An order that can finish: receipt sent once, charged once, each item shipped once."""
    charges = shop.charges(order)
    if charges > 1:
        raise LabCheckFailed(f"{order} was charged {charges} times{what}. Each attempt of your "
                             "charge asked the bank anew: what does the bank need to recognise "
                             "that it already charged this order?")
    for item in ITEMS:
        n = shop.shipped(order, item)
        if n > 1:
            raise LabCheckFailed(f"{order}'s {item} was shipped {n} times{what}: a shipment ran "
                                 "again and the warehouse did not recognise it.")
    if shop.receipts(order) > 1:
        raise LabCheckFailed(f"{order} got {shop.receipts(order)} receipts{what}.")
    if shop.receipts(order) == 0 or charges == 0 or not all(shop.shipped(order, i) for i in ITEMS):
        raise LabCheckFailed(
            f"{order} never finished{what} (charged {charges}, shipped "
            f"{[shop.shipped(order, i) for i in ITEMS]}, receipts {shop.receipts(order)}), and "
            f"nothing is left to run for it. {_why_unfinished(order)}")


def _why_unfinished(order: str) -> str:
    return {
        "ok-1": "Nothing went wrong with this order: run place_order by hand and read the "
                "worker's log.",
        "timeout": "The bank timed out once; asked again, it would have answered. What does "
                   "your charge do with a GatewayTimeout?",
        "crash-chain": "Its charge was running when the worker was killed. Which acknowledgement "
                       "mode gives a running step's message back?",
        "crash-chord": "One of its items was shipping when the worker was killed. Which "
                       "acknowledgement mode gives a running step's message back?",
    }.get(order, "")


@checker
def check_lab10(stack) -> None:
    """Run the learner's workflow through the faults above; print what passed, or raise a hint."""
    tasks = _module()
    stack.reset()  # a clean shop: no keys, counts or orders from an earlier run
    db = stack.redis
    db.hset("lab10:faults", mapping=FAULTS)
    db.hset("lab10:slow", mapping=SLOW)
    shop = _Shop(stack)
    worker = stack.spawn_worker(MODULE, name="lab10", concurrency=4, prefetch_multiplier=1)
    print(f"worker {worker.hostname} up (4 pool processes); eight orders to go")

    # 1. side by side: the reference and three failures that need no crash -------------------
    since = time.time()
    for order in ("ok-1", "declined", "timeout", "nostock"):
        _place(tasks, order)
    shop.wait(lambda: all(shop.receipts(o) for o in ("ok-1", "timeout")) and shop.quiet(since),
              since, "the first four orders")
    _finished_once(shop, "ok-1", "")
    ok("ok-1: charged once, both items shipped, one receipt")
    if shop.receipts("declined") or any(shop.shipped("declined", i) for i in ITEMS):
        raise LabCheckFailed("declined's card was refused, and yet it shipped or got a receipt: "
                             "the steps after a refused charge still ran. A step that fails for "
                             "good must end the workflow, not hand the next step a value.")
    ok("declined: nothing shipped, no receipt")
    _finished_once(shop, "timeout", " after the bank timed out once")
    ok("timeout: finished after the bank's timeout, charged once")
    if shop.receipts("nostock"):
        raise LabCheckFailed("nostock got a receipt, but its lamp never shipped (out of stock): "
                             "the receipt went out without every shipment having succeeded.")
    ok("nostock: no receipt for an order that did not ship in full")

    # 2. one SIGKILL, mid-chord and mid-chain ---------------------------------------------------
    since = time.time()
    _place(tasks, "crash-chord")
    shop.wait(lambda: shop.shipped("crash-chord", "lamp") and shop.called("ship-lamp", "crash-chord"),
              since, "crash-chord's lamp to ship")
    _place(tasks, "crash-chain")
    if not shop.wait(lambda: shop.charges("crash-chain"), since, "crash-chain's charge"):
        _finished_once(shop, "crash-chain", " (before any crash)")
    worker.kill()
    ids = set()
    for raw in db.hvals("unacked"):
        try:
            msg = json.loads(raw)
            ids.add(str((msg[0] if isinstance(msg, list) else msg)["headers"]["id"]))
        except (ValueError, KeyError, TypeError, IndexError):
            continue
    aged = age_unacked(db, ids)
    worker.start()
    print(f"  ..  worker SIGKILLed mid-charge and mid-shipment ({aged} message(s) held "
          "unacknowledged, aged as if an hour had passed); restarted")
    restarted = time.time()
    shop.wait(lambda: shop.receipts("crash-chain") and shop.receipts("crash-chord")
              and shop.quiet(restarted), restarted, "the crashed orders to finish")
    _finished_once(shop, "crash-chord", " after the worker was killed mid-shipment")
    _finished_once(shop, "crash-chain", " after the worker was killed mid-charge")
    ok("crash-chain and crash-chord: finished after the SIGKILL, charged once, each item "
       "shipped once")

    # 3. a chord's state lost, and the sweep ------------------------------------------------------
    since = time.time()
    _place(tasks, "expired")
    shop.wait(lambda: shop.called("ship-book", "expired") and shop.called("ship-lamp", "expired"),
              since, "expired's items to ship")
    lost = [k for k in db.scan_iter("celery-taskset-meta-*") if not k.endswith(b".c")]
    for key in lost:
        db.delete(key)
    shop.wait(lambda: shop.receipts("expired") and shop.quiet(since), since, "expired's chord")
    if lost and shop.receipts("expired"):
        raise LabCheckFailed("expired got a receipt although its chord's state was deleted "
                             "before its items had shipped: does the receipt wait for the "
                             "shipments?")
    placed = time.time()
    _place(tasks, "young")
    stuck_after = (placed - since) / 2 + 0.1  # expired is older than this, young far younger
    found = call_learner(tasks.sweep, stuck_after, what=f"sweep({stuck_after:.1f})")
    failed = shop.failed()
    if "young" in failed:
        raise LabCheckFailed(f"sweep({stuck_after:.1f}) recorded young, placed "
                             f"{time.time() - placed:.1f} s before and still running: an order "
                             "is stuck only once it is older than stuck_after.")
    receipted = [o for o in failed if shop.receipts(o)]
    if receipted:
        raise LabCheckFailed(f"{receipted[0]} got its receipt and yet is in failed_orders: the "
                             "team would chase an order that is fine.")
    for order, why in (("declined", "the bank refused its card"),
                       ("nostock", "one of its items is out of stock")):
        if order not in failed:
            raise LabCheckFailed(f"{order} cannot finish ({why}), and it is not in "
                                 "failed_orders, even after sweep(): the team never hears of it.")
    ok("declined and nostock: recorded in failed_orders")
    if lost and "expired" not in failed:
        raise LabCheckFailed(f"expired's chord state was deleted, so its receipt can never be "
                             f"sent, and sweep({stuck_after:.1f}) did not record it "
                             f"({time.time() - since:.1f} s after it was placed). No error "
                             "callback is ever called for it: what finds it?")
    if lost:
        ok(f"expired: its chord's state deleted; sweep({stuck_after:.1f}) recorded it "
           f"(it returned {found!r:.60})")
    else:
        _finished_once(shop, "expired", "")
        ok("expired: your workflow keeps no chord state in the result backend; it finished")
    ok("young: still running, not recorded")
    worker.kill()  # young is still being charged: the next check starts from a clean shop
    print("Lab 10 passed: charged once, shipped once, no receipt without every shipment, "
          "crashes recovered, and every order that cannot finish recorded.")
