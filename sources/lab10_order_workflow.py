# %% [markdown]
# # Lab 10 — An order workflow that fails safely
#
# An order is a workflow: **validate**, **charge** the card, **ship** each item (side by side: a
# chord), then send a **receipt**. Build it so that, whatever goes wrong,
#
# * each order is **charged at most once**, and each item shipped at most once;
# * **no receipt** goes out for an order that did not ship in full;
# * an order that **can finish, finishes** (a crash or a gateway hiccup is no reason to give up);
# * every order that **cannot finish** is recorded in the `failed_orders` hash (`record_failed`),
#   where the team looks.
#
# **What the check does**, with a worker of 4 processes on your module:
#
# | order | what happens to it | your workflow must |
# |---|---|---|
# | `expired` | its chord's state deleted from the result backend mid-chord (what a too short expiry or a flush does) | be recorded (by `sweep`: nothing else will) |
# | `ok-1` | nothing | charge once, ship both items, send one receipt |
# | `declined` | the bank refuses the card (`Declined`, for good) | ship nothing, send no receipt, be recorded |
# | `timeout-after` | the bank charges, then does not answer in time (`GatewayTimeout`), once | finish, charged once |
# | `timeout-before` | the bank does not answer in time and has not charged, once | finish, charged once |
# | `nostock` | the warehouse cannot ship one item (`OutOfStock`, for good) | send no receipt, be recorded |
# | `crash-receipt` | the whole worker SIGKILLed while the mail sends its receipt | finish, one receipt |
# | `crash-chord` | the same SIGKILL while one of its items ships | finish, each item shipped once |
# | `crash-chain` | the same SIGKILL while the bank answers its charge | finish, charged once |
# | `young` | running (its charge under way) when the check calls `sweep` | not be recorded |
#
# After the SIGKILL, the check restarts the worker with the visibility timeout (an hour)
# fast-forwarded for the dead worker's messages, as in lab 4. At the end it calls
# `sweep(stuck_after)` once, as a monitor would every minute, with `stuck_after` a second or
# two: between `young`'s age and the failed orders' ages. The check's worker consumes the
# `celery` queue, and waits up to 20 s for an order to finish: retry within a few seconds here.
#
# Chapter 10 has what you need; chapters 4 (idempotency) and 5 (retries) too. The partners'
# functions below are given: the bank, the warehouse and the mail each take an
# `idempotency_key` and act once per key.
#
# > **How to run this lab.** "Run All" stops at the first place you are meant to write (a cell
# > that raises `NotImplementedError`): that is expected. Write your answer there and run that
# > cell, then run the cells below it one by one; the **check** cell runs on its own and says
# > what passed, or gives a hint. Solved version: `solutions/` in the course folder.

# %%
import time
import uuid

import celerylab
from celerylab.checks import check_lab10, hint_button

stack = celerylab.start("lab10")
db = stack.redis  # the shop's database (the task module's `db` too)

# %% [markdown]
# ## The task module
#
# Fill in the marked places, then run the cell (it writes `lab10_tasks.py`).

# %%
# %%writefile lab10_tasks.py
"""Lab 10: an order workflow (validate -> charge -> a chord of shipments -> a receipt)."""

import os
import time

import redis
from celery import Celery, chain, chord  # noqa: F401 (for your workflow)

BROKER = os.environ["CELERYLAB_BROKER_URL"]
app = Celery("lab10_tasks", broker=BROKER, backend=BROKER)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    # The visibility timeout keeps its default, an hour. After it kills the worker, the checker
    # fast-forwards that hour for the dead worker's messages; kombu, in the restarted worker,
    # puts them back at start, and with these options sweeps every second (not every ~100 s).
    broker_transport_options={"unacked_restore_interval": 1, "unacked_restore_throttle": 1},
)
db = redis.Redis.from_url(BROKER)


# --- given: the shop's partners; the checker decides when they fail and how slow they are ---
class Declined(Exception):
    """The bank refused the card: for good, trying again will not help."""


class GatewayTimeout(Exception):
    """The bank did not answer in time: the charge may have gone through. Try again."""


class OutOfStock(Exception):
    """The warehouse cannot ship this item: for good."""


_ONCE = db.register_script("""
if ARGV[1] == '' or redis.call('HSETNX', KEYS[1], ARGV[1], 1) == 1 then
    return redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
end
return 0""")


def _partner(order_id, what, key, counter, field):
    """A partner's call: its effect, once per idempotency key (None: every time), then its
    answer (slow the first time, if the checker says so)."""
    db.rpush("lab10:calls", f"{what}:{order_id}")
    _ONCE(keys=[f"lab10:keys:{counter}", counter], args=["" if key is None else str(key), field])
    slow = db.hget("lab10:slow", f"{order_id}:{what}")
    db.hdel("lab10:slow", f"{order_id}:{what}")
    time.sleep(float(slow or 0.02))


def _fault(order_id):
    return (db.hget("lab10:faults", order_id) or b"").decode()


def bank_charge(order_id, idempotency_key):
    """Charge the order's card; returns a charge id. Once per idempotency key."""
    fault = _fault(order_id)
    if fault == "declined":
        raise Declined(f"card declined for {order_id}")
    if fault == "timeout-before" and db.hsetnx("lab10:timed-out", order_id, 1):
        raise GatewayTimeout(f"the bank did not answer in time for {order_id}")
    _partner(order_id, "charge", idempotency_key, "bank:charges", order_id)
    if fault == "timeout-after" and db.hsetnx("lab10:timed-out", order_id, 1):
        raise GatewayTimeout(f"the bank did not answer in time for {order_id}")
    return f"ch-{order_id}"


def warehouse_ship(order_id, item, idempotency_key):
    """Ship one item; returns a tracking id. Once per idempotency key."""
    if _fault(order_id) == f"out-of-stock:{item}":
        raise OutOfStock(f"{item} is out of stock ({order_id})")
    _partner(order_id, f"ship-{item}", idempotency_key, "shipments", f"{order_id}:{item}")
    return f"tr-{order_id}-{item}"


def send_receipt(order_id, tracking, idempotency_key):
    """E-mail the customer a receipt with the tracking ids. Once per idempotency key."""
    _partner(order_id, "receipt", idempotency_key, "receipts", order_id)


def record_failed(order_id, reason):
    """Where the team looks: `failed_orders` (order id -> why), on the shop's dashboard."""
    db.hset("failed_orders", order_id, str(reason)[:200])


@app.task
def validate(order_id, items):
    if not items:
        raise ValueError(f"{order_id} has no items")
    return items


# --- yours ---
# 1. Your settings.
### BEGIN SOLUTION
app.conf.update(
    task_acks_late=True,  # a worker killed mid-step gives the step back
    task_reject_on_worker_lost=True,  # and so does a pool process killed mid-step
)
### END SOLUTION


# 2. The steps (the chord's body gets the shipments' results first). Add parameters or options
#    as you need.
@app.task(bind=True)
def charge(self, order_id):
    """Charge the order (bank_charge)."""
    ### BEGIN SOLUTION
    try:  # one key per order: a retry or a redelivery cannot charge twice
        return bank_charge(order_id, idempotency_key=f"charge:{order_id}")
    except GatewayTimeout as exc:  # it may have charged: ask again, with the same key
        raise self.retry(exc=exc, countdown=0.2 * 2 ** self.request.retries,
                         max_retries=5) from None
    ### END SOLUTION


@app.task(bind=True)
def ship(self, order_id, item):
    """Ship one item (warehouse_ship)."""
    ### BEGIN SOLUTION
    return warehouse_ship(order_id, item, idempotency_key=f"ship:{order_id}:{item}")
    ### END SOLUTION


@app.task(bind=True)
def receipt(self, tracking, order_id):
    """The chord's body: send the receipt (send_receipt)."""
    ### BEGIN SOLUTION
    send_receipt(order_id, tracking, idempotency_key=f"receipt:{order_id}")
    ### END SOLUTION


@app.task
def order_failed(request, exc, traceback, order_id):
    """An error callback (link_error): record the order."""
    ### BEGIN SOLUTION
    record_failed(order_id, f"{request.task}: {exc!r}")
    ### END SOLUTION


def workflow(order_id, items):
    """The order's canvas: validate -> charge -> a chord of ship (one per item) -> receipt."""
    ### BEGIN SOLUTION
    flow = chain(validate.si(order_id, items), charge.si(order_id),
                 chord([ship.si(order_id, item) for item in items], receipt.s(order_id)))
    flow.link_error(order_failed.s(order_id))  # every step; a chord's body gets ChordError
    return flow
    ### END SOLUTION


# 3. The request path and the monitor.
def place_order(order_id, items):
    """The request path: remember the order, then send its workflow."""
    ### BEGIN SOLUTION
    db.hset("orders:placed", order_id, time.time())
    workflow(order_id, items).apply_async()
    ### END SOLUTION


def sweep(stuck_after):
    """A monitor calls this every minute: record (record_failed) every order placed more than
    stuck_after seconds ago that has no outcome yet (no receipt, not recorded); return their ids."""
    ### BEGIN SOLUTION
    # a crash or a lost chord calls no error callback: only a look from outside finds them
    now, stuck = time.time(), []
    for order_id, placed in db.hgetall("orders:placed").items():
        order_id, age = order_id.decode(), now - float(placed)
        if age > stuck_after and not db.hexists("receipts", order_id) \
                and not db.hexists("failed_orders", order_id):
            record_failed(order_id, f"no outcome {age:.0f} s after it was placed")
            stuck.append(order_id)
    return stuck
    ### END SOLUTION

# %% [markdown]
# Try it: a worker on your module, one order.

# %%
import lab10_tasks as tasks

worker = stack.spawn_worker("lab10_tasks", name="try", concurrency=4)
order = f"try-{uuid.uuid4().hex[:6]}"
tasks.place_order(order, ["book", "lamp"])
stack.wait_until(lambda: db.hget("receipts", order) or db.hget("failed_orders", order), 10,
                 "a receipt or a failure record")
print("receipts:", db.hget("receipts", order), " failed:", db.hget("failed_orders", order),
      " charged:", db.hget("bank:charges", order))
worker.stop()

# %% [markdown]
# ## Stuck?
#
# Each press gives a hint, each more specific than the last (three in all); none is
# the answer. (`hint("lab10")` from `celerylab.checks` does the same in a cell.)

# %%
hint_button("lab10")

# %% [markdown]
# ## Check
#
# About 5 s: a real worker, ten orders, a SIGKILL and a chord's state deleted.

# %%
check_lab10(stack)

# %%
stack.stop()
