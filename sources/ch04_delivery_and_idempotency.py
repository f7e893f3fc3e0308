# %% [markdown]
# # Chapter 4 — Delivery guarantees and idempotency
#
# Processes crash: a child is killed by the out-of-memory killer, a machine reboots, a deploy
# kills a worker mid-task. What happens to the task then depends on **when its message is
# acknowledged**, and that choice trades one failure for another:
#
# * acknowledge early (Celery's default): a crash can **lose** the task: *at most once*;
# * acknowledge late (`acks_late`): a crash can **repeat** the task: *at least once*. But only a
#   crash of the **whole worker**: when just the pool child running the task is killed (what the
#   OOM killer does), Celery acknowledges the message anyway and stores a failure, so `acks_late`
#   alone still **loses** it. `task_reject_on_worker_lost=True` (its default is `None`, which
#   behaves as `False`) or Celery 5.7's `task_retry_on_worker_lost` close that gap, each with its
#   own risk for a *poison message*; the table below shows all of it.
#
# "Exactly once" is not on the menu. It is built from at-least-once delivery plus **idempotent**
# tasks, which is what this chapter ends with. Every crash below is a real SIGKILL.

# %%
import json
import time

import celerylab
from celerylab import plots
from celerylab.recording import read_events

stack = celerylab.start("ch04")
r = stack.redis
assert stack.health()

# %%
# %%writefile ch04_tasks.py
"""Chapter 4's tasks: the same work under different acknowledgement settings."""

import os
import signal
import time

import redis
from celery import Celery

BROKER = os.environ["CELERYLAB_BROKER_URL"]

app = Celery("ch04_tasks", broker=BROKER, backend=BROKER)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=False,  # the default; the tasks below choose for themselves
    task_reject_on_worker_lost=None,  # the default (None behaves as False)
    task_retry_on_worker_lost=False,  # the default (Celery 5.7)
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        # seconds (default 3600): short, to watch it act, yet longer than the ~5 s a worker can
        # take to notice that a pool child was killed (else the timeout would act first)
        "visibility_timeout": 6,
        "unacked_restore_interval": 1,  # kombu 5.7: look every second...
        "unacked_restore_throttle": 1,  # ...and scan every time
    },
)
db = redis.Redis.from_url(BROKER)  # where the tasks' effects are written


def _ship(order_id, seconds):
    time.sleep(seconds)
    db.incr(f"effect:{order_id}")  # the effect happens at the end of the task


@app.task
def ship_early(order_id, seconds):
    _ship(order_id, seconds)


@app.task(acks_late=True)
def ship_late(order_id, seconds):
    _ship(order_id, seconds)


@app.task(acks_late=True, reject_on_worker_lost=True)
def ship_late_requeue(order_id, seconds):
    _ship(order_id, seconds)


@app.task(acks_late=True, retry_on_worker_lost=True, max_retries=2, default_retry_delay=0)
def ship_late_retry(order_id, seconds):
    _ship(order_id, seconds)


# A poison message: a payload that kills whichever child runs it (as one that always runs out of
# memory would). Requeued on every death, or retried at most max_retries times.
@app.task(acks_late=True, reject_on_worker_lost=True)
def poison_requeue(order_id):
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(acks_late=True, retry_on_worker_lost=True, max_retries=2, default_retry_delay=0)
def poison_retry(order_id):
    os.kill(os.getpid(), signal.SIGKILL)


# Charging a card: the effect first, then a slow call (a receipt) during which we crash.
@app.task(acks_late=True)
def charge_naive(payment_id, account, amount):
    db.incrby(f"balance:{account}", amount)
    time.sleep(1.5)


@app.task(acks_late=True)
def charge_once(payment_id, account, amount, key_ttl):
    if db.set(f"idem:{payment_id}", 1, nx=True, ex=key_ttl):  # the first delivery wins
        db.incrby(f"balance:{account}", amount)
    time.sleep(1.5)


@app.task(acks_late=True)
def charge_once_split(payment_id, account, amount):
    """SET NX, then INCRBY: two commands, and here a slow moment between them."""
    if db.set(f"idem:{payment_id}", 1, nx=True, ex=86400):
        time.sleep(1.5)  # a crash now leaves the key without the effect
        db.incrby(f"balance:{account}", amount)
    time.sleep(1.5)


@app.task(acks_late=True)
def charge_upsert(payment_id, account, amount):
    db.hset(f"payments:{account}", payment_id, amount)  # one field per payment: a rewrite is a no-op
    time.sleep(1.5)


# Validation at the boundary: arguments are checked where the message is produced.
VALIDATORS = {}


class ValidatingTask(app.Task):
    def apply_async(self, args=None, kwargs=None, **options):
        check = VALIDATORS.get(self.name)
        if check:
            check(*(args or ()), **(kwargs or {}))  # raises before anything is published
        return super().apply_async(args, kwargs, **options)


def check_refund(payment_id, amount_cents, currency):
    if not isinstance(amount_cents, int) or amount_cents <= 0:
        raise ValueError(f"amount_cents must be a positive whole number, got {amount_cents!r}")
    if currency not in {"EUR", "GBP", "USD"}:
        raise ValueError(f"currency must be EUR, GBP or USD, got {currency!r}")


@app.task(base=ValidatingTask)
def refund(payment_id, amount_cents, currency):
    return payment_id


VALIDATORS[refund.name] = check_refund


# %% [markdown]
# ## Six crashes, and a poison message
#
# Each case has its own queue and a one-child worker. A task that sleeps 1.5 s and then writes its
# effect is started, and then we SIGKILL either **the pool child** running it (as the OOM killer
# would) or **the whole worker** (main process and children, as a power cut would). Killed workers
# are started again. Then we count: what the result backend says, where the message was right after
# the crash, how many times the task started, and how many times its effect happened.
#
# Meanwhile, on a seventh worker (two children, queue `poison`), two *poison messages* run: tasks
# that kill whichever child runs them, one requeued on every death (`reject_on_worker_lost`), one
# retried (`retry_on_worker_lost`, `max_retries=2`).

# %%
import ch04_tasks

cases = [
    ("early ack", ch04_tasks.ship_early, "child"),
    ("acks_late", ch04_tasks.ship_late, "child"),
    ("acks_late + reject_on_worker_lost", ch04_tasks.ship_late_requeue, "child"),
    ("acks_late + retry_on_worker_lost", ch04_tasks.ship_late_retry, "child"),
    ("early ack", ch04_tasks.ship_early, "worker"),
    ("acks_late", ch04_tasks.ship_late, "worker"),
]
crash_workers = [stack.worker("ch04_tasks", name=f"case{i}", queues=[f"case{i}"], concurrency=1,
                              prefetch_multiplier=1) for i in range(len(cases))]
poison_worker = stack.worker("ch04_tasks", name="poison", queues=["poison"], concurrency=2,
                             prefetch_multiplier=1)
stack.start_workers(*crash_workers, poison_worker)
jobs = [task.apply_async((f"order-{i}", 1.5), queue=f"case{i}")
        for i, (_, task, _) in enumerate(cases)]
looping = ch04_tasks.poison_requeue.apply_async(("poison-1",), queue="poison")
bounded = ch04_tasks.poison_retry.apply_async(("poison-2",), queue="poison")
for job in jobs:
    stack.started(job.id)


def where_is(task_id, queue):
    """Is the message in its queue, held in `unacked`, or gone from Redis?"""
    if any(json.loads(m)["headers"]["id"] == task_id for m in r.lrange(queue, 0, -1)):
        return "in the queue"
    if any(json.loads(v)[0]["headers"]["id"] == task_id for v in r.hvals("unacked")):
        return "in unacked"
    return "gone"


after_crash = {}
for i, ((_, _, kill), w, job) in enumerate(zip(cases, crash_workers, jobs, strict=True)):
    if kill == "child":
        w.kill_child()
    else:
        w.kill()
        after_crash[i] = where_is(job.id, f"case{i}")  # a dead worker changes nothing any more
print("right after the whole-worker kills:", after_crash)
stack.start_workers(*(w for w in crash_workers if not w.alive));

# %%
expected_final = {0: "FAILURE", 1: "FAILURE", 2: "SUCCESS", 3: "SUCCESS", 5: "SUCCESS",
                  "bounded": "FAILURE"}  # case 4: see below
finals = dict(enumerate(jobs), bounded=bounded)
stack.wait_until(lambda: all(finals[k].state == s for k, s in expected_final.items()), 30,
                 "the crashed tasks to settle")
events = read_events(r)
rows = []
for i, ((setting, _, kill), job) in enumerate(zip(cases, jobs, strict=True)):
    starts = sum(e["event"] == "started" and e["id"] == job.id for e in events)
    rows.append({"setting": setting, "killed": kill, "backend state": job.state,
                 "message after the crash": after_crash.get(i, "-"), "runs started": starts,
                 "effect applied": int(r.get(f"effect:order-{i}") or 0)})
plots.table(rows)


def starts_of(job):
    return sum(e["event"] == "started" and e["id"] == job.id for e in read_events(r))


poison = {"requeued on every death": (starts_of(looping), looping.state),
          "retried, max_retries=2": (starts_of(bounded), bounded.state)}
print("poison messages (runs started, backend state):", poison)

# %%
assert [row["effect applied"] for row in rows] == [0, 0, 1, 1, 0, 1]
assert [row["runs started"] for row in rows] == [1, 1, 2, 2, 1, 2], rows
assert [row["backend state"] for row in rows] == [
    "FAILURE", "FAILURE", "SUCCESS", "SUCCESS", "PENDING", "SUCCESS"]
assert after_crash == {4: "gone", 5: "in unacked"}
assert "signal 9" in str(jobs[1].result), "WorkerLostError: the child died"
assert poison["retried, max_retries=2"] == (3, "FAILURE"), "1 run + 2 retries, then it gives up"
assert poison["requeued on every death"][0] >= 2 and looping.state not in ("SUCCESS", "FAILURE")

# %% [markdown]
# The requeued poison message is still looping: it will kill a child forever. A loop like this
# is stopped by hand: **revoke** the task id (the remote-control command every worker obeys; on
# the command line `celery -A ch04_tasks control revoke <id>`). Celery 5.7 stores `REVOKED` as
# soon as a worker gets the command (unless the task is running right then), and the worker
# discards the message when it comes back: we wait for both.

# %%
stack.control.control.revoke(looping.id)


def discarded():  # REVOKED, and the message neither waiting nor held by a worker
    held = [v for v in r.hvals("unacked") if json.loads(v)[0]["headers"]["id"] == looping.id]
    return looping.state == "REVOKED" and r.llen("poison") == 0 and not held


stack.wait_until(discarded, 15, "the poison message to be discarded")
print("poison message after revoke:", looping.state, "after", starts_of(looping), "deaths")
deaths = starts_of(looping)
stack.wait_until(lambda: discarded() and starts_of(looping) == deaths, 3, "the loop to stay stopped")
assert looping.state == "REVOKED"
stack.stop_workers()

# %% [markdown]
# Read the table row by row:
#
# 1. **early ack, child killed**: the message was acknowledged when the task started; the worker
#    records `WorkerLostError` and the task is **lost**.
# 2. **acks_late, child killed**: surprising but true: still lost. By default Celery acknowledges a
#    task whose child died (a task that kills its child would otherwise loop forever: a *poison
#    message*). `task_reject_on_worker_lost=True` (row 3) requeues it instead; Celery 5.7 also has
#    `task_retry_on_worker_lost`, which re-sends it as a retry.
# 3. **acks_late + reject_on_worker_lost**: requeued, ran again, **succeeded**.
# 4. **acks_late + retry_on_worker_lost** (Celery 5.7): the worker's main process re-sent it as a
#    *retry* (a new message, `retries` + 1, after `default_retry_delay`, here 0 s): it ran again and
#    **succeeded**. Unlike a requeue it counts against `max_retries`, so a poison message ends:
#    the second poison task above ran 1 + 2 times and stopped at `FAILURE`, while the requeued one
#    kept killing children until it was revoked. That is the risk `reject_on_worker_lost` carries.
# 5. **early ack, worker killed**: the message is gone from Redis and the backend never heard of
#    the task (`PENDING` forever): **lost, silently**.
# 6. **acks_late, worker killed**: the message waited in `unacked`; after the visibility timeout
#    it came back and the restarted worker **ran it again**.
#
# Rows 3, 4 and 6 ran the task twice. Here the first run died before its effect, so no harm done.
# Had the crash come *after* the effect, the effect would have happened twice: that is what
# at-least-once means, and the last section deals with it.
#
# ## Duplicates without any crash: two pitfalls of the visibility timeout
#
# The visibility timeout cannot tell a dead worker from a slow one. Anything a worker holds
# unacknowledged for longer than the timeout is delivered **again**, while the first copy is
# still there:
#
# * **a countdown (or ETA) longer than the timeout**: the worker holds the message until it is
#   due; here an 8 s countdown against a 6 s timeout;
# * **a prefetched message that waits longer than the timeout**: here a task reserved behind an
#   8 s task.

# %%
eta_worker = stack.worker("ch04_tasks", name="eta", queues=["eta"], concurrency=1)
reserve_worker = stack.worker("ch04_tasks", name="reserve", queues=["reserve"], concurrency=1,
                              prefetch_multiplier=4)
stack.start_workers(eta_worker, reserve_worker)
later = ch04_tasks.ship_early.apply_async(("eta-order", 0), queue="eta", countdown=8)
blocker = ch04_tasks.ship_early.apply_async(("blocker", 8), queue="reserve")
waiting = ch04_tasks.ship_early.apply_async(("reserved-order", 0), queue="reserve")
stack.wait_until(lambda: int(r.get("effect:blocker") or 0) >= 1, 15, "the 8 s task")
stack.wait_until(lambda: all(int(r.get(f"effect:{k}") or 0) >= 2
                             for k in ("eta-order", "reserved-order")), 10, "the duplicates")
duplicates = {k: int(r.get(f"effect:{k}")) for k in ("eta-order", "reserved-order")}
events = read_events(r)  # raw events: several copies of one task can be in flight at once
plots.table([{"task": key, "deliveries received": sum(e["event"] == "received" and e["id"] == t.id
                                                      for e in events),
              "redelivered copies": sum(e["event"] == "received" and e["id"] == t.id
                                        and e["redelivered"] for e in events),
              "times the effect happened": duplicates[key]}
             for key, t in (("eta-order", later), ("reserved-order", waiting))])

# %%
received = {key: [e for e in events if e["event"] == "received" and e["id"] == t.id]
            for key, t in (("eta-order", later), ("reserved-order", waiting))}
# Celery's own account: one message, received again from Redis (redelivered), no worker crashed.
assert all(len(got) >= 2 and any(e["redelivered"] for e in got[1:]) for got in received.values())
assert eta_worker.alive and reserve_worker.alive, "with no crash at all"
stack.stop_workers()

# %% [markdown]
# Fixes: keep countdowns, ETAs and the time a message can sit in a worker's reserve (prefetch ×
# task duration) well under the visibility timeout, or raise the timeout (the default is an hour),
# and make tasks idempotent so a duplicate does no harm.
#
# ## At least once means duplicates: idempotent tasks
#
# A charge applies its effect, then calls a slow receipt service, and the worker dies during that
# call. Four ways to write it, all with `acks_late`:
#
# * **naive**: `INCRBY` the balance;
# * **idempotency key**: `SET idem:<payment_id> 1 NX EX <ttl>` first; only the delivery that
#   creates the key applies the effect;
# * the same with a **TTL shorter than the redelivery delay** (1 s, against a 6 s timeout);
# * **upsert**: write the payment under its id (`HSET payments:<account> <payment_id> <amount>`);
#   the balance is the sum, and writing the same payment twice changes nothing.
#
# A fifth charge uses the key too, but its `SET NX` and `INCRBY` are two commands with a moment
# between them (widened to 1.5 s here), and the crash lands in that moment.

# %%
charger = stack.spawn_worker("ch04_tasks", name="charger", queues=["charges"], concurrency=5,
                             prefetch_multiplier=1)
charges = [
    ch04_tasks.charge_naive.apply_async(("pay-1", "naive", 100), queue="charges"),
    ch04_tasks.charge_once.apply_async(("pay-2", "keyed", 100, 86400), queue="charges"),
    ch04_tasks.charge_once.apply_async(("pay-3", "short-ttl", 100, 1), queue="charges"),
    ch04_tasks.charge_upsert.apply_async(("pay-4", "upsert", 100), queue="charges"),
    ch04_tasks.charge_once_split.apply_async(("pay-5", "split", 100), queue="charges"),
]
ACCOUNTS = ("naive", "keyed", "short-ttl", "split")


def balances():
    values = {acct: int(r.get(f"balance:{acct}") or 0) for acct in ACCOUNTS}
    values["upsert"] = sum(int(v) for v in r.hvals("payments:upsert"))
    return values


def crash_moment():  # four effects applied, and the split charge between its two commands
    b = balances()
    return r.exists("idem:pay-5") and all(v for k, v in b.items() if k != "split")


stack.wait_until(crash_moment, 10, "every charge to reach its crash point")
charger.kill()  # mid-receipt (and mid-pair): none of the five was acknowledged
before = balances()
charger.start()
stack.wait_until(lambda: all(c.state == "SUCCESS" for c in charges), 20, "the redeliveries")
after = balances()
plots.table([{"charge": k, "balance after the crash": before[k], "after redelivery": after[k]}
             for k in after])

# %%
assert before == {"naive": 100, "keyed": 100, "short-ttl": 100, "split": 0, "upsert": 100}
assert after == {"naive": 200, "keyed": 100, "short-ttl": 200, "split": 0, "upsert": 100}
assert charges[4].state == "SUCCESS" and r.exists("idem:pay-5"), "reported done, never charged"
stack.stop_workers()

# %% [markdown]
# The key's **TTL is a promise**: "a duplicate arriving within this time is recognised". Too short
# (shorter than a redelivery can take: visibility timeout, retries, a replay from a dead-letter
# queue days later) and duplicates slip through; too long and keys pile up in Redis. Size it to the
# longest path a duplicate can take, and watch memory.
#
# And the `split` row: `SET NX` and `INCRBY` are two commands. The crash came between them, so the
# key existed without the effect; the redelivery saw the key, skipped the effect and reported
# `SUCCESS`: the payment was **lost**, with every record saying it went through. Make the pair
# atomic (a Lua script; a plain `MULTI`/`EXEC` cannot make `INCRBY` depend on the `SET NX`
# result, `WATCH` with a read first can), or use an upsert, which is one command.
# Lab 4 asks for it.
#
# ## Validation at the boundary
#
# A bad payload should fail **where it is produced**, with a clear error, not minutes later in a
# worker (or, worse, succeed with nonsense). Three guards, all before anything reaches the broker:
# `refund`'s own validator (`ValidatingTask.apply_async`), Celery's argument check against the
# task's signature (`typing=True`, the default), and the JSON serializer refusing what it cannot
# encode.

# %%
attempts = {
    "refund('p1', -5, 'EUR')": lambda: ch04_tasks.refund.delay("p1", -5, "EUR"),
    "refund('p1', 500, 'BTC')": lambda: ch04_tasks.refund.delay("p1", 500, "BTC"),
    "ship_early('order-x')": lambda: ch04_tasks.ship_early.delay("order-x"),
    "ship_early(object(), 0)": lambda: ch04_tasks.ship_early.delay(object(), 0),
    "refund('p1', 500, 'EUR')": lambda: ch04_tasks.refund.delay("p1", 500, "EUR"),
}
outcomes = []
for call, send in attempts.items():
    try:
        send()
        outcomes.append({"call": call, "result": "published"})
    except Exception as exc:
        outcomes.append({"call": call, "result": f"{type(exc).__name__}: {exc}"[:90]})
plots.table(outcomes)

# %%
assert [o["result"].split(":")[0] for o in outcomes] == [
    "ValueError", "ValueError", "TypeError", "EncodeError", "published"]
assert r.llen("celery") == 1, "only the valid refund reached the queue"

# %% [markdown]
# ## Lab 4
#
# [labs/lab04_exactly_once_payments.ipynb](../labs/lab04_exactly_once_payments.ipynb) (your copy, in your workspace): make a payment task crash-safe and idempotent; the
# checker kills the worker mid-flight and counts every cent. **Next:** Chapter 5 — retries,
# backoff and dead letters.

# %%
stack.stop()
