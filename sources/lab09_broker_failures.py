# %% [markdown]
# # Lab 9 — Orders that survive the broker
#
# A shop's web process takes orders and hands each to a worker through Redis. Today, when the
# broker blips, orders run twice; when it is down, requests fail and their orders are gone; when
# it freezes, requests hang; and when a worker stops consuming, nobody notices. Make it survive:
#
# 1. **the task module** (`lab09_tasks.py`): the settings, the bound `RECONNECT_WITHIN_S` you
#    promise (seconds from the broker's return until your worker consumes again, after an
#    outage of any length; at most 60), and
#    `record_order`, whose effect (`HINCRBY shipped <order_id> 1` in `db`) happens **once per
#    order**, however often its message arrives;
# 2. **the request path** (this notebook is the web process): `submit(order_id)` returns
#    `"sent"` or `"outbox"` fast, whatever the broker does, and never loses the order;
#    `drain_outbox()` sends what waits in the outbox and returns how many it sent;
# 3. **a liveness probe**: `probe()` returns `True` only if the worker really consumes the
#    `celery` queue now.
#
# **What the check does**, on a broker of its own with your worker (2 processes):
#
# | fault | your answer must |
# |---|---|
# | none (the reference) | ship orders once; `probe()` says healthy |
# | every connection dropped while two 1.5 s orders run | ship each once; consume again |
# | the broker stopped for 2.5 s, then started (empty) | `submit` answers `"outbox"` within 2 s each; a `drain_outbox()` during the outage keeps what it could not send; after `drain_outbox()` each order ships once; the worker consumes again within `RECONNECT_WITHIN_S` of the broker's return |
# | the broker frozen (SIGSTOP) | `submit` answers within 3 s; after the thaw and `drain_outbox()` the order ships once |
# | the worker stops consuming, still answering `ping`; then its pool processes freeze | `probe()` says unhealthy (within 10 s) each time, and healthy again once it consumes |
# | your module on a Redis Sentinel set; the primary killed with two orders running | `submit` answers within 2 s; the worker consumes again within `RECONNECT_WITHIN_S` of the promotion; after `drain_outbox()` each order ships once |
#
# | an order that shipped, sent again at the end | it does not ship twice; no memory of an order expires within the visibility timeout (an hour) |
#
# (After a failover, the orders that were running are acknowledged to a primary that is gone:
# under `acks_late` they come back after the visibility timeout, an hour later. The check cannot
# wait that long; your idempotent `record_order` is what makes that harmless.)
#
# Chapter 9 has everything you need. The outbox must survive what the broker does (so not in
# the broker) and a restart of this process (so not only in memory: the check cannot restart
# your notebook, so it cannot tell; don't rely on it there). Publish through the module
# (`tasks.record_order`), not a name imported from it: the check points the module at other
# brokers and back.
#
# > **How to run this lab.** "Run All" stops at the first place you are meant to write (a cell
# > that raises `NotImplementedError`): that is expected. Write your answer there and run that
# > cell, then run the cells below it one by one; the **check** cell runs on its own and says
# > what passed, or gives a hint. Solved version: `solutions/` in the course folder.

# %%
import os
import sqlite3  # noqa: F401 (for your outbox, if you like)
import time
import uuid

from kombu.exceptions import OperationalError  # noqa: F401 (what a failed publish raises)

import celerylab
from celerylab import outage
from celerylab.checks import check_lab09, hint_button

stack = celerylab.start("lab09")
broker = outage.spare_broker(stack)  # the broker the check will break
os.environ["LAB09_BROKER"] = broker.url
db = stack.redis  # the shop's database (the task module's `db` too)

# %% [markdown]
# ## The task module
#
# Fill in the two marked places, then run the cell (it writes `lab09_tasks.py`).

# %%
# %%writefile lab09_tasks.py
"""Lab 9: orders that survive the broker."""

import os
import time

import redis
from celery import Celery

app = Celery("lab09_tasks", broker=os.environ["LAB09_BROKER"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    # the name a Redis Sentinel set knows its primary by (used when the broker is sentinel://)
    broker_transport_options={"master_name": "celerylab"},
)
db = redis.Redis.from_url(os.environ["CELERYLAB_BROKER_URL"])  # the shop's database

# 1. Your settings, and the bound you promise.
### BEGIN SOLUTION
app.conf.update(
    task_acks_late=True,  # a dropped connection or a dead worker gives the order back
    broker_connection_retry=True,
    broker_connection_max_retries=None,  # never give up on the broker
    # a frozen broker: every read and connect gives up after 0.5 s...
    broker_transport_options={**app.conf.broker_transport_options,
                              "socket_timeout": 0.5, "socket_connect_timeout": 0.5},
    # ...and a publish tries twice at most
    task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2,
                               "interval_max": 0.2},
)
# kombu retries the worker's connection 2 s, 4 s, 6 s ... up to 30 s apart: after a long
# outage the next attempt can come up to 30 s after the broker is back (plus the connect)
RECONNECT_WITHIN_S = 35

# the mark and the effect in one step (chapter 4): a duplicate finds the mark
SHIP_ONCE = db.register_script("""
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
    return redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
end
return false
""")
### END SOLUTION


@app.task
def record_order(order_id, seconds=0.0):
    db.rpush("attempts", order_id)  # given: the checker counts attempts
    time.sleep(seconds)  # given: the warehouse's slow part
    # 2. Ship it: HINCRBY shipped <order_id> 1 in db, once per order.
    ### BEGIN SOLUTION
    SHIP_ONCE(keys=[f"shipped:{order_id}", "shipped"], args=[order_id, 7 * 24 * 3600])
    ### END SOLUTION

# %% [markdown]
# ## The request path
#
# `submit(order_id)` is what a request handler calls. Send the task with
# `lab09_tasks.record_order.apply_async((order_id,))` (and any options you choose).

# %%
import lab09_tasks as tasks

# %%
### BEGIN SOLUTION
# the outbox: a SQLite file beside the notebook, not the broker and not only memory
OUTBOX = sqlite3.connect("lab09_outbox.sqlite3", check_same_thread=False)
OUTBOX.execute("CREATE TABLE IF NOT EXISTS outbox (order_id TEXT PRIMARY KEY)")
### END SOLUTION


def submit(order_id):
    """Hand the order to a worker: "sent", or "outbox" when the broker is away. Fast, always."""
    ### BEGIN SOLUTION
    try:  # one attempt: no retry policy, no reconnect loop (chapter 9)
        tasks.record_order.apply_async((order_id,), retry=True, retry_policy={"max_retries": 0})
        return "sent"
    except OperationalError:  # refused, or timed out (it may have arrived: the task is idempotent)
        with OUTBOX:
            OUTBOX.execute("INSERT OR IGNORE INTO outbox VALUES (?)", (order_id,))
        return "outbox"
    ### END SOLUTION


def drain_outbox():
    """Send what waits in the outbox; return how many were sent."""
    ### BEGIN SOLUTION
    sent = 0
    for (order_id,) in OUTBOX.execute("SELECT order_id FROM outbox").fetchall():
        try:
            tasks.record_order.apply_async((order_id,), retry=True,
                                           retry_policy={"max_retries": 0})
        except OperationalError:
            break  # still away: the rest waits for the next drain
        with OUTBOX:  # deleted only once sent
            OUTBOX.execute("DELETE FROM outbox WHERE order_id = ?", (order_id,))
        sent += 1
    return sent
    ### END SOLUTION

# %% [markdown]
# ## The probe
#
# `probe()` is what a monitor calls every minute: `True` when the worker consumes the `celery`
# queue now. It may publish, and read `db`.

# %%
def probe():
    """True when the worker really consumes the celery queue now."""
    ### BEGIN SOLUTION
    # a canary order through the queue; its age is the signal (chapter 7's lag, for one message)
    canary = f"canary-{uuid.uuid4().hex[:8]}"
    tasks.record_order.apply_async((canary,), retry=True, retry_policy={"max_retries": 0})
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        if db.hget("shipped", canary):
            return True
        time.sleep(0.05)
    return False
    ### END SOLUTION

# %% [markdown]
# Try it: a worker on your module, one order, the probe.

# %%
worker = stack.spawn_worker("lab09_tasks", name="try", concurrency=2)
print(submit(f"try-{uuid.uuid4().hex[:6]}"), "probe:", probe())
worker.stop()

# %% [markdown]
# ## Stuck?
#
# Each press gives a hint, each more specific than the last (three in all); none is
# the answer. (`hint("lab09")` from `celerylab.checks` does the same in a cell.)

# %%
hint_button("lab09")

# %% [markdown]
# ## Check
#
# About 20 s: a real worker, a real broker dropped, stopped and frozen.

# %%
check_lab09(submit, drain_outbox, probe, broker, stack)

# %%
stack.stop()
