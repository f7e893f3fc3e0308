# %% [markdown]
# # Chapter 9 — When the broker fails
#
# One of the Celery failures teams report most (Celery issues 8030, 8082, 8091, 10205, and the
# same reports in projects that run Celery) is not a task bug. The broker goes away
# for a moment (a network blip, a restart, a failover) and afterwards a worker is alive,
# answers `ping`, and does no work. Or a web request calls `.delay()` while the broker is
# away and waits, or fails, and the task is lost with it.
#
# This chapter breaks a broker on purpose, with real workers and a real Redis, and counts what
# happened to every task:
#
# 1. **every connection dropped**, with tasks running, reserved and waiting, under early and
#    late acknowledgement;
# 2. **the broker restarted**: how long until the worker consumes again, and what the producer
#    does meanwhile;
# 3. **the broker frozen**: it accepts connections and answers nothing;
# 4. **a worker alive but not consuming**, and a probe that catches it;
# 5. **failover** with Redis Sentinel, and what asynchronous replication loses;
# 6. on RabbitMQ, a **quorum queue's delivery limit** ending a poison message's loop.
#
# Tasks record what they did in the notebook's own Redis (the "database"). The broker is a second
# `redis-server` of the course's own, so we can break it and still count. It keeps an
# append-only file (chapter 1), so what waits in it survives a restart.

# %%
import base64
import json
import os
import sqlite3
import threading
import time
import uuid

import redis
from kombu.exceptions import OperationalError

import celerylab
from celerylab import outage, plots
from celerylab.rabbit import rabbitmq_status, rabbitmq_url
from celerylab.recording import all_finished

stack = celerylab.start("ch09")
db = stack.redis  # where the tasks write what they did
broker = outage.spare_broker(stack, appendonly=True)  # the redis-server this chapter breaks
bq = redis.Redis(port=broker.port, socket_timeout=5)  # a look inside the broker
os.environ["CH09_BROKER"] = broker.url
print("broker:", broker.url, " pid", broker.pid, "  database:", stack.url)

# %% [markdown]
# ## The settings this chapter is about
#
# Every setting below is written out with **its default**: the chapter shows what the defaults
# do. `broker_connection_retry` makes a worker reconnect after a lost connection,
# `broker_connection_max_retries` is how many attempts before it gives up (and exits),
# `worker_cancel_long_running_tasks_on_connection_loss` decides what becomes of running
# `acks_late` tasks when the connection is lost (Celery 5.7 warns that its default becomes `True`
# in Celery 6). `task_publish_retry` and its policy are the *producer's* side: what `.delay()`
# does when it cannot reach the broker.

# %%
# %%writefile ch09_tasks.py
"""Chapter 9's tasks: orders that count their runs, while the broker fails around them."""

import os
import time

import redis
from celery import Celery

app = Celery("ch09_tasks", broker=os.environ["CH09_BROKER"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,  # what happened is counted in the database below
    broker_connection_retry_on_startup=True,
    # --- the defaults of celery 5.7, written out ---
    broker_connection_retry=True,  # reconnect after a lost connection...
    broker_connection_max_retries=100,  # ...this many times, then exit (None: forever)
    worker_cancel_long_running_tasks_on_connection_loss=False,  # True in Celery 6
    broker_connection_timeout=4,  # s: on Redis, how long a producer's reconnect loop may take
    task_publish_retry=True,  # .delay() retries a publish that fails...
    task_publish_retry_policy={"max_retries": 3, "interval_start": 0,
                               "interval_step": 0.2, "interval_max": 1},  # ...like this
    broker_transport_options={},  # no socket_timeout: a read waits forever
)
db = redis.Redis.from_url(os.environ["CELERYLAB_BROKER_URL"])


@app.task
def ship(order_id, seconds):  # acknowledged early (the default)
    db.hincrby("ran", order_id, 1)
    time.sleep(seconds)


@app.task(acks_late=True)
def ship_late(order_id, seconds):  # acknowledged when it returns
    db.hincrby("ran", order_id, 1)
    time.sleep(seconds)

# %%
import ch09_tasks as t
from celery import Celery

defaults = Celery(set_as_current=False).conf
for key in ("broker_connection_retry", "broker_connection_max_retries",
            "worker_cancel_long_running_tasks_on_connection_loss", "broker_connection_timeout",
            "task_publish_retry", "task_publish_retry_policy", "broker_transport_options"):
    assert t.app.conf[key] == defaults[key], key  # written out, and still the defaults
w = stack.spawn_worker("ch09_tasks", name="w1", concurrency=2, prefetch_multiplier=4)


def runs(prefix):
    """{order: how many times it started}, for the orders whose id starts with prefix."""
    return {k.decode(): int(v) for k, v in db.hgetall("ran").items()
            if k.decode().startswith(prefix)}


def settled():
    """Nothing waits in the broker, nothing is unacknowledged, and every order's latest delivery
    has finished. (A redelivered copy keeps its delivery tag: the first copy's ack
    clears the `unacked` entry of a copy that has not run yet.)"""
    return bq.llen("celery") == 0 and bq.hlen("unacked") == 0 and all_finished(stack.records())

# %% [markdown]
# ## 1. Every connection dropped
#
# Six 1.5 s orders on a worker with 2 pool processes: 2 run, 4 wait in the worker's prefetch
# (reserved). Then `CLIENT KILL TYPE normal` closes every normal client connection of the broker
# (all but Pub/Sub ones, like the workers' remote control, and our own), as a
# network blip or a proxy restart would. We drop it while the worker's consumer waits in a
# blocking pop (`BRPOP`), so the worker sees the loss at once.

# %%
def drop_during(task, prefix):
    ids = [f"{prefix}-{i}" for i in range(6)]
    for order in ids:
        task.delay(order, 1.5)
    stack.wait_until(lambda: len(runs(prefix)) == 2 and outage.consumers_waiting(bq) > 0, 10,
                     "two orders running and the consumer waiting")
    running = set(runs(prefix))
    t0 = time.monotonic()
    dropped = outage.drop_connections(bq)
    stack.wait_until(lambda: outage.consumers_waiting(bq) > 0, 10, "the consumer back")
    back = time.monotonic() - t0
    stack.wait_until(lambda: len(runs(prefix)) == 6 and settled(), 20, "every order run")
    print(f"{task.name}: {dropped} connections dropped; consuming again after {back * 1000:.0f} ms")
    print("   runs per order:", runs(prefix), " running at the drop:", sorted(running))
    return running, runs(prefix)


running, early = drop_during(t.ship, "early")
assert set(early.values()) == {1}  # early ack: each order ran once
running_late, late = drop_during(t.ship_late, "late")
twice = {order for order, n in late.items() if n == 2}
assert twice == running_late and set(late.values()) == {1, 2}

# %%
log = w.log_tail(400)
for needle in ("Connection to broker lost", "Restoring", "CPendingDeprecationWarning"):
    print(f"{needle!r} in the worker's log:", needle in log)
    assert needle in log
print([line for line in log.splitlines() if "Restoring" in line][-2:])

# %% [markdown]
# What happened, counted:
#
# * the worker noticed at once, reconnected within milliseconds (the first reconnect attempt
#   is immediate) and logged `Restoring N unacknowledged message(s)`: every message it held
#   unacknowledged went back to the queue;
# * **early ack**: the two running orders were already acknowledged, so only the four reserved
#   ones were restored; each order ran once;
# * **`acks_late`**: the two running orders were unacknowledged too, so they were restored and
#   **ran a second time** while their first runs finished. A dropped connection is a
#   redelivery, like the crash of chapter 4: a late-acknowledged task must be idempotent.
#
# It depends on timing, too: a consumer that is *not* inside `BRPOP` (its prefetch window full)
# notices the loss only at its next command, maybe after the running tasks were acknowledged.
# Count it on your own set-up before you trust either outcome.
#
# ## 2. The broker restarted
#
# Now the broker goes away for 3 s, cleanly (SIGTERM: the append-only file keeps every message).
# A fresh worker holds orders of both kinds, six acknowledged early and six late: 2 running, as
# many reserved as its prefetch limit allows (it counts unacknowledged messages, so an
# early-acked running order frees its slot), the rest waiting in the broker (printed below).
# Meanwhile, a producer publishes. The worker's reconnect
# attempts are not a setting of Celery's: kombu's `ensure_connection` waits 2 s, then 4 s,
# 6 s ... up to 30 s between attempts; `broker_connection_max_retries` only counts them.

# %%
OUTBOX = sqlite3.connect(stack.rundir / "outbox.sqlite3", check_same_thread=False)
OUTBOX.execute("CREATE TABLE IF NOT EXISTS outbox (order_id TEXT PRIMARY KEY)")


NO_RETRY = {"max_retries": 0}  # one attempt, no reconnect loop


def submit(order_id):
    """The request path: publish once, without retrying; if the broker is away, keep the order
    in an outbox of another store (here SQLite on disk), to be sent later."""
    try:
        t.ship.apply_async((order_id, 0), retry=True, retry_policy=NO_RETRY)
        return "sent"
    except OperationalError:
        with OUTBOX:
            OUTBOX.execute("INSERT OR IGNORE INTO outbox VALUES (?)", (order_id,))
        return "outbox"


def drain_outbox():
    """A later job: send what waits in the outbox, delete each row only once it is sent."""
    sent = 0
    for (order_id,) in OUTBOX.execute("SELECT order_id FROM outbox").fetchall():
        t.ship.apply_async((order_id, 0), retry=True, retry_policy=NO_RETRY)
        with OUTBOX:
            OUTBOX.execute("DELETE FROM outbox WHERE order_id = ?", (order_id,))
        sent += 1
    return sent

# %%
w.stop()  # a fresh worker for each part: the counts above stay apart from the ones below
w = stack.spawn_worker("ch09_tasks", name="w2", concurrency=2, prefetch_multiplier=4)
for i in range(6):
    t.ship.delay(f"held-early-{i}", 1.0)
    t.ship_late.delay(f"held-late-{i}", 1.0)
stack.wait_until(lambda: len(runs("held-")) == 2, 10, "two orders running")
print("before the restart:", {"waiting": bq.llen("celery"), "unacked": bq.hlen("unacked")})
broker.stop()
down = time.monotonic()
t0 = time.monotonic()
try:
    t.ship.delay("default-policy", 0)
except OperationalError as exc:
    default_took, default_error = time.monotonic() - t0, exc
t0 = time.monotonic()
answers = [submit(f"req-{i}") for i in range(3)]
submit_took = (time.monotonic() - t0) / 3
print(f".delay() with the default retry policy raised after {default_took:.2f} s: "
      f"{type(default_error).__name__}: {str(default_error)[:70]}")
print(f"submit() answered {answers}, in {submit_took * 1000:.0f} ms each")
assert answers == ["outbox"] * 3 and submit_took < default_took / 5
stack.wait_until(lambda: time.monotonic() - down > 3, 5, "3 s of outage")  # the outage itself
broker.start(watchdog=stack.watchdog)
up = time.monotonic()
stack.wait_until(lambda: outage.consumers_waiting(bq) > 0, 40, "the worker consuming again")
resumed = time.monotonic() - up
print(f"drained {drain_outbox()} orders from the outbox")
stack.wait_until(lambda: len(runs("req-")) == 3 and bq.llen("celery") == 0  # nothing waits,
                 and all(a.finished for a in stack.records() if a.started),  # nothing runs
                 20, "every order that can run to run")
print(f"broker back after {up - down:.1f} s; the worker consumed again {resumed:.1f} s later")
print("outbox orders:", runs("req-"))
assert runs("req-") == {"req-0": 1, "req-1": 1, "req-2": 1}

# %%
def order_of(entry):
    """The order id in one of kombu's `unacked` entries: [message, exchange, routing key]."""
    message, _exchange, _routing_key = json.loads(entry)
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return args[0]


held = sorted(order_of(v) for v in bq.hvals("unacked"))
orders = [f"held-{kind}-{i}" for kind in ("early", "late") for i in range(6)]
plots.table([{"order": o, "ran": runs(o).get(o, 0), "held in unacked": o in held} for o in orders])
assert "Restoring" in w.log_tail(400)  # it tried, at the loss, against a broker already gone
assert set(runs("held-")) | set(held) == set(orders)  # nothing lost...
assert held  # ...but these wait for the visibility timeout
print(f"{len(held)} orders wait in `unacked` for the visibility timeout")
# an hour from now they would run; we move on: forget them, and the attempts recorded so far
bq.delete("unacked", "unacked_index")
stack.clear_records()

# %%
retries = [line.split("Trying again")[1].strip() for line in w.log_tail(400).splitlines()
           if "Trying again" in line]
print("the worker's reconnect attempts:", retries)
assert retries and "in 2.00 seconds" in retries[0]

# %% [markdown]
# Three things to take away:
#
# * `.delay()` did not hang: a **refused** connection fails fast (0.6 s here). The request
#   still failed, and its order would be lost with it if nobody caught the error.
#   (`retry=False` is not the bound it seems: before a publish, kombu makes sure the connection
#   is up with a loop of its own, bounded by `broker_connection_timeout` and by whatever retry
#   policy that pooled connection last published with: kombu/messaging.py copies a publish's
#   `retry_policy` into the connection's transport options. An explicit policy of no retries,
#   as `submit()` passes, answered in milliseconds.)
# * `submit()` keeps the request fast *and* the order: one attempt, then an **outbox** in
#   another store, drained by a later job. The outbox must not live in the broker (it is the
#   thing that is down) and rows are deleted only after they were sent: a crash in between sends
#   one twice, so the task must be idempotent (chapter 4).
# * The worker came back on its own, but **seconds after** the broker did: its attempts were
#   2 s, then 4 s apart. A bound you promise ("the worker consumes within N s of the broker's
#   return") must include that schedule. With `broker_connection_max_retries=100` it gives up
#   after about 47 minutes (2 + 4 + ... + 30, then 30 s each) and exits; a supervisor must then
#   restart it.
#
# * What the worker **held** did not come back with it. At the loss it logged `Restoring N
#   unacknowledged message(s)`, but the broker was gone, so nothing was restored: those orders
#   stay in kombu's `unacked` hash until the **visibility timeout** (an hour by default, chapter 1)
#   has passed since they were fetched. The table shows them, early and late alike (under
#   `acks_late`, the ones that were running ran *and* wait to run again). A restart delays what
#   workers held by up to an hour: the reason a shorter visibility timeout is tempting, and
#   chapter 1 showed its price (long tasks run twice). What waited in the broker ran as soon
#   as the worker was back: the append-only file kept it.
#
# ## 3. The broker frozen
#
# A stalled host (a long `fork` for a snapshot, a paused VM, a swapping machine) is worse than a dead
# one: its port still accepts connections, and nothing answers. Here the broker process is
# stopped (SIGSTOP) for 3 s. The default producer has no socket timeout; a second producer
# has `socket_timeout` and `socket_connect_timeout` in its `broker_transport_options`.

# %%
bounded = Celery("web", broker=broker.url, set_as_current=False)
bounded.conf.update(
    task_serializer="json",
    accept_content=["json"],
    broker_transport_options={"socket_timeout": 0.5, "socket_connect_timeout": 0.5},
    task_publish_retry_policy={"max_retries": 1, "interval_start": 0,
                               "interval_step": 0.2, "interval_max": 0.2},
)
bounded.send_task("ch09_tasks.ship", ("warm-up", 0))  # connected before the freeze


def publish_default():
    t.ship.delay("frozen-default", 0)


with outage.frozen(broker):
    blocked = threading.Thread(target=publish_default, daemon=True)
    blocked.start()
    t0 = time.monotonic()
    try:
        bounded.send_task("ch09_tasks.ship", ("frozen-bounded", 0))
    except OperationalError as exc:
        bounded_took, bounded_error = time.monotonic() - t0, exc
    blocked.join(timeout=max(0.5, 3 - (time.monotonic() - t0)))  # frozen 3 s in all
    still_blocked = blocked.is_alive()
blocked.join(timeout=10)
print(f"bounded producer: {type(bounded_error).__name__} after {bounded_took:.2f} s "
      f"({bounded_error})")
print(f"default producer: still waiting when the broker resumed: {still_blocked}; "
      f"it returned after that: {not blocked.is_alive()}")
assert still_blocked and isinstance(bounded_error, OperationalError)
stack.wait_until(lambda: {"frozen-default", "frozen-bounded"} <= set(runs("frozen"))
                 and bq.llen("celery") == 0, 20, "both publishes to arrive and run")
print("runs:", runs("frozen"))
assert runs("frozen-bounded")  # the publish that "failed" arrived anyway

# %% [markdown]
# The default producer waited as long as the broker was frozen, and would have waited forever:
# `socket_timeout` is `None` by default. A web request would have hung with it. With a socket
# timeout the publish failed after a few socket timeouts (the publish, then kombu's reconnect
# attempts, each bounded by `socket_timeout`: here 3 x 0.5 s), and `submit()` above would have
# put the order in its outbox.
#
# The publish that "failed" with a timeout **arrived anyway**: the frozen server's kernel
# accepted its bytes, and Redis executed them when it resumed. A timeout means "unknown", not
# "not sent": an outbox that re-sends
# after a timeout can send twice, one more reason for idempotent tasks.
#
# The worker's consumer waits in `BRPOP` and saw nothing wrong: a frozen broker looks like an
# empty queue. kombu 5.7 drops a consumer connection whose `BRPOP` has been silent for longer
# than `brpop_timeout + health_check_interval` and reconnects (its docstring puts recovery from a
# half-open connection within about 51 s by default; `health_check_interval`, a
# `broker_transport_options` key, is 25 s). Our 3 s freeze is far shorter than that; and a
# reconnect to a broker that is still frozen would hang without a `socket_timeout` too.
#
# ## 4. Alive, answering, and doing nothing
#
# The reports say: the worker process runs, `celery inspect ping` answers `pong`, and the queue
# grows. Here we make one on purpose: `cancel_consumer` tells the worker to stop consuming a
# queue (what a consumer that never recovered from a lost connection looks like from outside).

# %%
def probe(app, queue="celery", within=2.0):
    """Healthy when a canary task sent to `queue` starts within `within` seconds."""
    canary = f"canary-{uuid.uuid4().hex[:8]}"
    app.send_task("ch09_tasks.ship", (canary, 0), queue=queue)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if db.hget("ran", canary):
            return True
        time.sleep(0.05)
    return False


print("before:", {"process alive": w.alive, "ping": bool(t.app.control.ping([w.hostname], 1)),
                  "probe": probe(t.app)})
assert probe(t.app)
t.app.control.cancel_consumer("celery", destination=[w.hostname], reply=True)
stuck = {"process alive": w.alive, "ping": bool(t.app.control.ping([w.hostname], 1)),
         "probe": probe(t.app)}
print("stuck: ", stuck, " waiting in the queue:", bq.llen("celery"))
assert stuck == {"process alive": True, "ping": True, "probe": False}
t.app.control.add_consumer("celery", destination=[w.hostname], reply=True)
assert probe(t.app, within=5)

# %% [markdown]
# A process check and `ping` both said "fine": `ping` travels on the worker's *control*
# channel (a broadcast, answered by the main process), not on the queue. Only work going
# through the queue proves the queue is consumed. A canary per queue, sent every minute, whose
# **age** is a metric, is chapter 7's lag alert applied to a probe: page when the canary is older
# than the bound, not when the process is gone.
#
# ## 5. Failover: Redis Sentinel
#
# A Redis primary, a replica, and three sentinels that agree (2 of 3) when the primary is down
# and then promote the replica. All are `redis-server` processes of the course's own
# (`redis-server sentinel.conf --sentinel` is a Sentinel), stopped with this notebook. Celery
# reaches them through kombu's `sentinel://` transport: a list of sentinels, and the name of
# the primary in `broker_transport_options`.

# %%
sentinel_set = outage.sentinels(stack)
os.environ["CH09_SENTINELS"] = sentinel_set.url
print(sentinel_set.url)

# %%
# %%writefile ch09_failover_tasks.py
"""Chapter 9's orders on a broker behind Redis Sentinel."""

import os
import time

import redis
from celery import Celery

app = Celery("ch09_failover_tasks", broker=os.environ["CH09_SENTINELS"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"master_name": "celerylab",  # what the sentinels call it
                              "socket_timeout": 1, "socket_connect_timeout": 1},
    task_acks_late=True,
    worker_prefetch_multiplier=1,
)
db = redis.Redis.from_url(os.environ["CELERYLAB_BROKER_URL"])


@app.task
def ship(order_id, seconds):
    db.hincrby("ran", order_id, 1)
    time.sleep(seconds)

# %%
import ch09_failover_tasks as f

fw = stack.spawn_worker("ch09_failover_tasks", name="fw", concurrency=2, prefetch_multiplier=1)
for i in range(4):
    f.ship.delay(f"fo-{i}", 1.0)
stack.wait_until(lambda: len(runs("fo-")) == 2, 10, "two orders running")
primary = redis.Redis(port=sentinel_set.primary_port(), socket_timeout=2)
assert primary.wait(1, 5000) == 1  # the replica has everything so far (WAIT)
# a partition: the replica cut off, then 5 reports published that only the primary receives
sentinel_set.cut_off_replica()
for i in range(5):
    f.app.send_task("ch09_failover_tasks.ship", (f"report-{i}", 0), queue="reports")
on_primary = primary.llen("reports")
old = sentinel_set.primary_port()
killed = time.monotonic()
sentinel_set.kill_primary()
sentinel_set.heal_replica()
promoted_after = sentinel_set.wait_for_failover(old, timeout=20)
f.ship.delay("fo-after", 0)
stack.wait_until(lambda: "fo-after" in runs("fo-"), 30, "an order published after the failover")
resumed_after = time.monotonic() - killed
stack.wait_until(lambda: len(runs("fo-")) == 5, 20, "the orders in flight")
new_primary = redis.Redis(port=sentinel_set.primary_port(), socket_timeout=2)
print(f"replica promoted {promoted_after:.1f} s after the kill; work resumed after "
      f"{resumed_after:.1f} s")
print("orders:", runs("fo-"))
print(f"reports on the old primary: {on_primary}; on the promoted replica: "
      f"{new_primary.llen('reports')}")
assert min(runs("fo-").values()) >= 1 and on_primary == 5 and new_primary.llen("reports") == 0
fw.stop()

# %% [markdown]
# The sentinels promoted the replica within a few seconds; the worker found the new primary on
# its next reconnect attempt (2 s, 4 s ... apart again). It may also not come back at all: with
# kombu 5.7's `sentinel://` transport, a worker that holds unacknowledged messages when the
# primary dies can exit with `Unrecoverable error: AttributeError("'NoneType' object has no
# attribute 'hostname'")` while it restores them (lab 9's check meets it with a prefetch
# multiplier of 4, and says so when it does). Run workers under a supervisor that starts them
# again (systemd, Kubernetes, supervisord), and alert on restarts.
#
# Every order that had reached the replica ran. The five reports had not: the replica was cut off when they were published, and Redis
# replicates **asynchronously**, so the primary acknowledged them and died with them. Bounds:
# `min-replicas-to-write` (the primary refuses writes while fewer replicas are connected with a
# lag under `min-replicas-max-lag`: a narrower window of loss, not none), `WAIT` after a critical
# publish, or an outbox that keeps an order until the task says it ran.
#
# ## 6. RabbitMQ: a poison message and a quorum queue's delivery limit
#
# A message that makes every consumer fail *and requeue it* loops forever on a classic queue.
# A quorum queue counts deliveries and drops (or dead-letters) a message past its
# `x-delivery-limit`. Both queues below get one poison message.

# %%
rabbit_ok, rabbit_message = rabbitmq_status()
print(rabbit_message)
if not rabbit_ok:
    print("SKIPPED: this part needs a reachable RabbitMQ (see above).")
os.environ["CH09_RUN"] = f"{stack.namespace}-{uuid.uuid4().hex[:8]}"

# %%
# %%writefile ch09_rabbit_tasks.py
"""Chapter 9 on RabbitMQ: a poison message on a classic and on a quorum queue."""

import os

import redis
from celery import Celery
from celery.exceptions import Reject
from kombu import Exchange, Queue

RUN = os.environ["CH09_RUN"]
exchange = Exchange(f"poison-{RUN}", type="direct")
classic = Queue(f"classic-{RUN}", exchange, routing_key="classic")
quorum = Queue(f"quorum-{RUN}", exchange, routing_key="quorum",
               queue_arguments={"x-queue-type": "quorum", "x-delivery-limit": 3})

app = Celery("ch09_rabbit_tasks",
             broker=os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//"),
             backend=os.environ["CELERYLAB_BROKER_URL"])  # results are not kept, see below
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_queues=[classic, quorum],
    task_acks_late=True,  # so that a Reject reaches the broker
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)
db = redis.Redis.from_url(os.environ["CELERYLAB_BROKER_URL"])


@app.task
def parse(name):
    db.hincrby("deliveries", name, 1)
    raise Reject("cannot parse this, someone else may", requeue=True)

# %%
if rabbit_ok:
    import ch09_rabbit_tasks as rb
    from kombu import Connection

    rabbit_worker = stack.spawn_worker("ch09_rabbit_tasks", name="rabbit",
                                       queues=[rb.classic.name, rb.quorum.name], concurrency=1,
                                       prefetch_multiplier=1)
    rb.parse.apply_async(("classic",), queue=rb.classic.name, routing_key="classic")
    rb.parse.apply_async(("quorum",), queue=rb.quorum.name, routing_key="quorum")

    def deliveries():
        return {k.decode(): int(v) for k, v in db.hgetall("deliveries").items()}

    stack.wait_until(lambda: deliveries().get("classic", 0) >= 50
                     and deliveries().get("quorum", 0) >= 4, 20, "the poison loop")
    quorum_then = deliveries()["quorum"]
    rabbit_worker.stop()
    counted = deliveries()
    print("deliveries:", counted)
    with Connection(rabbitmq_url()) as conn:  # leave RabbitMQ as we found it
        for queue in (rb.classic, rb.quorum):
            queue.bind(conn).delete()
        rb.exchange.bind(conn).delete()
    assert counted["quorum"] == quorum_then == 4 and counted["classic"] > 4 * counted["quorum"]

# %% [markdown]
# The classic queue handed the same message back again and again until we stopped the worker;
# the quorum queue delivered it 4 times (the first delivery and 3 redeliveries) and dropped it.
# Give the quorum queue an `x-dead-letter-exchange` and it keeps the message for a person
# instead (chapter 5). On Redis there is no delivery count: chapter 5's retry limit is yours.
#
# ## What to watch
#
# | failure | what the team sees | what bounds it | test | metric |
# |---|---|---|---|---|
# | connection dropped | log "Connection to broker lost", "Restoring N"; `acks_late` tasks ran twice | idempotent tasks (ch. 4) | drop connections mid-task, count effects | duplicate effects (idempotency-key hits) |
# | broker restarted | worker idle for seconds after the broker is back; `.delay()` raises | kombu's retry schedule (2, 4, 6 ... s), `broker_connection_max_retries`, a supervisor | restart the broker, time the first task | canary age per queue |
# | broker frozen | requests hang; workers quiet | `socket_timeout`, `socket_connect_timeout`, `health_check_interval` | SIGSTOP the broker, time a publish | publish latency, p99 |
# | producer sees the broker away | requests fail or hang, orders lost | one bounded publish + an outbox in another store, drained later | publish with the broker down, drain, count | outbox size and oldest age |
# | alive but not consuming | process up, `ping` answers, queue grows | a canary per queue (ch. 7) | `cancel_consumer`, run the probe | canary age |
# | failover | seconds without a primary; messages not yet replicated lost | Sentinel, `min-replicas-to-write`, `WAIT`, an outbox | kill the primary in a partition, count | messages published vs run |
# | poison message requeued | the same task over and over | a quorum queue's `x-delivery-limit`, a retry limit (ch. 5) | a task that always rejects | deliveries per message |
#
# ## Lab 9
#
# [labs/lab09_broker_failures.ipynb](../labs/lab09_broker_failures.ipynb) (your copy, in your
# workspace): make a producer and a worker survive a dropped connection, a frozen broker and a
# restart, and write the probe that catches a worker that stopped consuming.

# %%
stack.stop()
