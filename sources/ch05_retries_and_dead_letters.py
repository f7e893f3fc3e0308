# %% [markdown]
# # Chapter 5 — Retries, backoff and dead letters
#
# Dependencies fail. Most failures are **transient** (a timeout, a 503, a restart) and the right
# answer is to try again *later*, waiting longer each time (**backoff**) and not all at once
# (**jitter**), a bounded number of times. Some failures are **permanent**: a malformed request, a
# bug. Retrying those only burns time, and a message that fails forever is a **poison message**. It
# belongs in a **dead-letter queue**: kept with its payload and its error, out of the way, until
# somebody fixes the cause and **replays** it.

# %%
import json
import os
import time
import uuid

import matplotlib.pyplot as plt

import celerylab
from celerylab import plots
from celerylab.rabbit import rabbitmq_status, rabbitmq_url

stack = celerylab.start("ch05")
r = stack.redis
assert stack.health()

# %%
# %%writefile ch05_tasks.py
"""Chapter 5's tasks: a flaky dependency, retry policies, a dead-letter queue."""

import json
import os
import time

import redis
from celery import Celery, signals

BROKER = os.environ["CELERYLAB_BROKER_URL"]

app = Celery("ch05_tasks", broker=BROKER, backend=BROKER)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=False,
    worker_prefetch_multiplier=1,
    broker_transport_options={"visibility_timeout": 3600},  # the default: retries' ETAs stay below
    broker_connection_retry_on_startup=True,
)
db = redis.Redis.from_url(BROKER)


class DependencyDown(Exception):
    """The payment provider did not answer: worth trying again later."""


def flaky_call(key):
    """Fails while the counter fail:<key> is positive (the notebook sets it)."""
    if db.decr(f"fail:{key}") >= 0:
        raise DependencyDown(f"payment provider unavailable ({key})")
    return f"synced {key}"


@app.task(bind=True, max_retries=4)
def sync_manual(self, key):
    """Explicit self.retry: any countdown, sub-second too (0.2, 0.4, 0.8, 1.6 s)."""
    try:
        return flaky_call(key)
    except DependencyDown as exc:
        raise self.retry(exc=exc, countdown=0.2 * 2**self.request.retries) from exc


@app.task(autoretry_for=(DependencyDown,), retry_backoff=1, retry_backoff_max=600,
          retry_jitter=False, max_retries=3)
def sync_backoff(key):
    """autoretry_for: delay = min(retry_backoff_max, retry_backoff * 2**retries) = 1, 2, 4 s."""
    return flaky_call(key)


@app.task(autoretry_for=(DependencyDown,), retry_backoff=1, retry_backoff_max=2,
          retry_jitter=False, max_retries=3)
def sync_capped(key):
    """The same, capped at 2 s: 1, 2, 2 s."""
    return flaky_call(key)


@app.task(autoretry_for=(DependencyDown,), retry_backoff=0.5, retry_backoff_max=600,
          retry_jitter=False, max_retries=2)
def sync_half(key):
    """retry_backoff=0.5 asks for 0.5, 1 s, but Celery's factor is int(max(1.0, 0.5)) = 1
    (celery/app/autoretry.py): 1, 2 s."""
    return flaky_call(key)


@app.task(autoretry_for=(DependencyDown,), retry_backoff=1, retry_backoff_max=600,
          retry_jitter=True, max_retries=2)
def sync_jitter(key):
    """Full jitter: a random whole number of seconds in [0, delay]."""
    return flaky_call(key)


# A dead-letter queue on Redis: a list, fed when a task has failed for good.
DEAD_LETTERS = "dead-letters"


def dead_letter(queue, task, task_id, args, kwargs, exc):
    db.lpush(queue, json.dumps({
        "task": task.name, "id": task_id, "args": list(args or ()), "kwargs": kwargs or {},
        "error": f"{type(exc).__name__}: {exc}", "attempts": task.request.retries + 1,
        "failed_at": time.time()}))


@signals.task_failure.connect
def _dead_letter_on_failure(sender=None, task_id=None, exception=None, args=None, kwargs=None,
                            **_):
    """Once per task that failed for good (not on each retry): for an exception in the task
    (sent in the pool child), and by the worker's main process for a killed child, a hard time
    limit or a Reject(requeue=False). (Nothing is sent for a task lost with its whole worker
    under early ack: chapter 4.) Only tasks declared with `dead_letters` are dead-lettered."""
    queue = getattr(sender, "dead_letters", None)
    if queue:
        dead_letter(queue, sender, task_id, args, kwargs, exception)


@app.task(dead_letters=DEAD_LETTERS, autoretry_for=(DependencyDown,), max_retries=2,
          default_retry_delay=0.2)
def import_order(order):
    if order["currency"] not in ("EUR", "USD") and not db.exists("parser:accepts-all"):
        raise ValueError(f"unknown currency {order['currency']!r}")  # permanent: never retried
    return flaky_call(order["id"])  # transient: retried twice, then dead-lettered


# The tempting way, Task.on_failure: it runs only for an exception raised in the task (and a
# hard time limit), not when the child is killed.
class OnFailureDeadLetters(app.Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo):
        dead_letter("dead-letters:on_failure", self, task_id, args, kwargs, exc)


def _resize(image):
    if image.get("huge"):
        os.kill(os.getpid(), 9)  # as the OOM killer would: SIGKILL, nothing runs after it
    return image["name"]


@app.task(base=OnFailureDeadLetters)
def resize_on_failure(image):
    return _resize(image)


@app.task(dead_letters="dead-letters:signal")
def resize_signal(image):
    return _resize(image)


# %% [markdown]
# ## Five retry policies, measured
#
# The dependency fails a set number of times per call (`fail:<key>`). Each policy gets a call
# that fails 3 times (jitter: 2 times, eight calls; `sync_half`, whose `retry_backoff=0.5` Celery
# raises to a whole 1: 2 times), and one more `sync_manual` call that never
# recovers. A retry is **a new message with an ETA**, published by the worker; the worker holds it
# until it is due.

# %%
import ch05_tasks

for key, failures in {"backoff": 3, "capped": 3, "manual": 3, "hopeless": 99, "half": 2}.items():
    r.set(f"fail:{key}", failures)
for i in range(8):
    r.set(f"fail:jitter-{i}", 2)

worker = stack.spawn_worker("ch05_tasks", name="w1", concurrency=6)
calls = {
    "sync_backoff": ch05_tasks.sync_backoff.delay("backoff"),
    "sync_capped": ch05_tasks.sync_capped.delay("capped"),
    "sync_manual": ch05_tasks.sync_manual.delay("manual"),
    "sync_manual (never recovers)": ch05_tasks.sync_manual.delay("hopeless"),
    "sync_half (retry_backoff=0.5)": ch05_tasks.sync_half.delay("half"),
}
jittered = [ch05_tasks.sync_jitter.delay(f"jitter-{i}") for i in range(8)]

# %% [markdown]
# While `sync_backoff` waits for its first retry, the retry is visible in Redis: the worker holds
# it in `unacked`, with the **same task id**, `retries` = 1 and an `eta`.

# %%
def held_retry(task_id):
    """The headers of a retry of ``task_id`` held in `unacked` (until a child accepts the
    original, it is held there too, with `retries` 0)."""
    for raw in r.hvals("unacked"):
        headers = json.loads(raw)[0]["headers"]
        if headers["id"] == task_id and headers["retries"] >= 1:
            return headers
    return None


retry_headers = stack.wait_until(lambda: held_retry(calls["sync_backoff"].id), 10,
                                 "the first retry message")
print({k: retry_headers[k] for k in ("task", "id", "retries", "eta")})
from datetime import datetime

eta = datetime.fromisoformat(retry_headers["eta"]).timestamp()
due_in = eta - retry_headers["celerylab_sent_at"]  # the course's publish-time stamp
print(f"published with an ETA {due_in:.2f} s after it was published")
assert retry_headers["retries"] == 1, "the first retry is the one held first"
assert 0.9 < due_in < 1.1, "due one backoff step (1 s) after it was published"

# %%
ids = [c.id for c in calls.values()] + [j.id for j in jittered]
stack.wait_until(lambda: all(stack.outcome(c.id) for c in [*calls.values(), *jittered]),
                 30, "every call to succeed or give up")


def gaps(task_id):
    """Seconds each retry waited: from its publish (when its countdown starts, just before the
    failed attempt ends) to its start."""
    runs = sorted((a for a in stack.records([task_id]) if a.started), key=lambda a: a.started)
    return [round(b.started - b.sent, 2) for b in runs[1:]]


measured = {name: gaps(c.id) for name, c in calls.items()}
formula = {"sync_backoff": [1, 2, 4], "sync_capped": [1, 2, 2], "sync_manual": [0.2, 0.4, 0.8],
           "sync_manual (never recovers)": [0.2, 0.4, 0.8, 1.6],
           "sync_half (retry_backoff=0.5)": [1, 2]}  # the factor is raised to a whole 1
plots.table([{"policy": name, "measured gaps (s)": measured[name], "formula (s)": formula[name],
              "outcome": stack.outcome(calls[name].id)} for name in calls])

# %%
# The slack above each delay is what this machine needs right now to deliver a due message: twice
# the longest of the first attempts' waits from sent to started, measured in the same run, plus
# 0.3 s. (Below: 0.1 s at most, as a retry's countdown starts when it is built, a moment before
# it is published.)
first_waits = [min((a for a in stack.records([c.id]) if a.started), key=lambda a: a.started).wait
               for c in calls.values()]
slack = 0.3 + 2 * max(first_waits)
print(f"slack: {slack:.2f} s")
for name, expected in formula.items():
    assert len(measured[name]) == len(expected), (name, measured[name])
    for got, want in zip(measured[name], expected, strict=True):
        assert want - 0.1 <= got <= want + slack, (name, measured[name])
assert [stack.outcome(c.id) for c in calls.values()] == [
    "SUCCESS", "SUCCESS", "SUCCESS", "FAILURE", "SUCCESS"]
assert isinstance(calls["sync_manual (never recovers)"].result, ch05_tasks.DependencyDown), \
    "when retries run out, the original exception is raised"

# %% [markdown]
# With `retry_jitter=True` each delay is a random **whole** number of seconds between 0 and the
# backoff delay (Celery's backoff works in whole seconds: `retry_backoff=0.5` would be raised
# to 1). Eight callers that failed together no longer retry together. (A 0 s delay has a side
# effect worth knowing: the retry can run while the attempt that sent it is still storing its
# `RETRY` state. The backend refuses to overwrite a stored `SUCCESS` (`celery/backends/base.py`
# reads the state before it writes), so a stale `RETRY` needs the retry's `SUCCESS` to land in the
# moment between that read and that write: a narrow race, seen about once in a few hundred
# retries here, not the rule. The course reads outcomes from its recording of Celery's signals,
# `stack.outcome`, which no such race can confuse.)

# %%
jitter_gaps = [gaps(j.id) for j in jittered]
print(jitter_gaps)
assert all(stack.outcome(j.id) == "SUCCESS" for j in jittered)
assert all(len(g) == 2 and g[0] <= 1 + slack and g[1] <= 2 + slack for g in jitter_gaps)
assert len({tuple(round(x) for x in g) for g in jitter_gaps}) > 1, "not all in lockstep"
# Whole seconds: with a 1 s first step, the callers' first retries come in two waves, not a spread.
waves = {0: sum(g[0] <= 0.5 for g in jitter_gaps), 1: sum(g[0] > 0.5 for g in jitter_gaps)}
print(f"first retry after ~0 s: {waves[0]} callers, after ~1 s: {waves[1]} callers")
assert all(-0.1 <= g[0] <= slack or 0.9 <= g[0] <= 1 + slack for g in jitter_gaps), \
    "two waves: 0 or 1 s"

# %% [markdown]
# One task's attempts over time: each dot is an attempt, at the time it started; the label is the
# delay before it.

# %%
def plot_attempts(ax, task_id, title):
    runs = sorted((a for a in stack.records([task_id]) if a.started), key=lambda a: a.started)
    t0 = runs[0].started
    for n, a in enumerate(runs):
        color = {"SUCCESS": "tab:green", "RETRY": "tab:orange"}.get(a.state, "tab:red")
        ax.scatter(a.started - t0, n + 1, s=80, color=color, zorder=3)
        if n:
            ax.annotate(f"+{a.started - a.sent:.1f} s", (a.started - t0, n + 1),
                        textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.plot([a.started - t0 for a in runs], range(1, len(runs) + 1), color="0.7", zorder=1)
    ax.set(xlabel="seconds since the first attempt", ylabel="attempt", title=title)


fig, axes = plt.subplots(1, 2, figsize=(11, 3))
plot_attempts(axes[0], calls["sync_backoff"].id,
              f"sync_backoff: waited {', '.join(f'{g:.1f}' for g in measured['sync_backoff'])} s "
              "(orange: retry)")
plot_attempts(axes[1], calls["sync_manual (never recovers)"].id,
              "sync_manual, never recovers (red: gave up)")
plots.tidy(fig)

# %% [markdown]
# ## Poison messages and a dead-letter queue on Redis
#
# Redis has no dead-lettering of its own (kombu's `deadletter_queue` option only catches
# *unroutable* messages). The `task_failure` signal handler above builds one: Celery sends the
# signal once a task has failed for good, and the handler pushes the original payload, the error
# and the attempt count onto the list `dead-letters` (for tasks declared with `dead_letters=`).
# Three orders: one fine, one with a currency the parser rejects (a permanent error, not retried),
# one whose dependency is down for longer than the retries last.

# %%
r.set("fail:order-3", 99)
orders = [{"id": "order-1", "currency": "EUR"}, {"id": "order-2", "currency": "XBT"},
          {"id": "order-3", "currency": "USD"}]
results = [ch05_tasks.import_order.delay(o) for o in orders]
stack.wait_until(lambda: all(x.state in ("SUCCESS", "FAILURE") for x in results)
                 and r.llen("dead-letters") >= 2, 15, "the orders to settle")  # letters follow
letters = [json.loads(x) for x in r.lrange("dead-letters", 0, -1)][::-1]  # oldest first
plots.table([{k: v for k, v in letter.items() if k not in ("kwargs", "failed_at")}
             for letter in letters])

# %%
assert [x.state for x in results] == ["SUCCESS", "FAILURE", "FAILURE"]
assert {letter["args"][0]["id"]: letter["attempts"] for letter in letters} == {
    "order-2": 1, "order-3": 3}, "the permanent error was not retried; the outage was, twice"
assert [letter["error"].split(":")[0] for letter in letters] == ["ValueError", "DependencyDown"], \
    "each letter names the exception that killed it"

# %% [markdown]
# **Why a signal, and not `Task.on_failure`?** `on_failure` looks like the natural hook, and the
# two agree for an exception raised inside the task. But `on_failure` runs in the pool child, from
# Celery's tracer (`celery/app/trace.py`; the one other caller is the main process's handling of
# a hard time limit): when the child itself dies (the OOM killer, a segfault
# in a C library), nothing runs in it any more. The worker's main process then stores the failure
# (`WorkerLostError`), calls the `link_error` errbacks and sends `task_failure`
# (`celery/worker/request.py`), but never calls `on_failure`. (It is not called for a `Reject`
# either.) Two copies of a task whose payload kills its child, one dead-lettered by `on_failure`,
# one by the signal:

# %%
huge = {"name": "poster.tiff", "huge": True}
crashed = [ch05_tasks.resize_on_failure.delay(huge), ch05_tasks.resize_signal.delay(huge)]
# the worker stores FAILURE, then sends task_failure: wait for the signal's letter too
stack.wait_until(lambda: all(x.state == "FAILURE" for x in crashed)
                 and r.llen("dead-letters:signal") >= 1, 20, "the crashed resizes")
caught = {name: [json.loads(x)["error"] for x in r.lrange(f"dead-letters:{name}", 0, -1)]
          for name in ("on_failure", "signal")}
plots.table([{"dead-lettered by": k, "letters": len(v), "error": v[0] if v else "-"}
             for k, v in caught.items()])

# %%
assert all(type(x.result).__name__ == "WorkerLostError" for x in crashed), "both children died"
assert caught["on_failure"] == [], "on_failure never ran: the crash left no dead letter"
assert len(caught["signal"]) == 1 and caught["signal"][0].startswith("WorkerLostError")

# %% [markdown]
# **Fix the cause, then replay.** The parser learns the new currency and the provider comes back;
# each dead letter is re-sent with its original payload and leaves the dead-letter list.

# %%
r.set("parser:accepts-all", 1)
r.delete("fail:order-3")
replayed = []
while (raw := r.rpop("dead-letters")) is not None:  # oldest first
    letter = json.loads(raw)
    replayed.append(ch05_tasks.app.send_task(letter["task"], letter["args"], letter["kwargs"]))
outputs = [x.get(timeout=10) for x in replayed]
print(outputs)
assert [x.state for x in replayed] == ["SUCCESS", "SUCCESS"]
assert outputs == ["synced order-2", "synced order-3"], "the original payloads, oldest first"
worker.stop()

# %% [markdown]
# ## RabbitMQ's native dead-lettering
#
# RabbitMQ does this in the broker: a queue declared with `x-dead-letter-exchange` forwards every
# message that is **rejected without requeue** (or expires) to that exchange, with an `x-death`
# header saying why. In Celery, a task raises `Reject(requeue=False)`; with `acks_late` the
# worker then rejects the message instead of acknowledging it. The cells below use RabbitMQ at
# `RABBITMQ_URL` (default `amqp://guest:guest@127.0.0.1:5672//`, or
# `docker compose --profile rabbitmq up`), with queue names unique to this run, deleted at the end.

# %%
rabbit_ok, rabbit_message = rabbitmq_status()
print(rabbit_message)
if not rabbit_ok:
    print("SKIPPED: the RabbitMQ part of this chapter needs a reachable RabbitMQ (see above).")
os.environ["CH05_RUN"] = f"{stack.namespace}-{uuid.uuid4().hex[:8]}"  # read by the module

# %%
# %%writefile ch05_rabbit_tasks.py
"""Chapter 5 on RabbitMQ: a queue that dead-letters what its consumers reject."""

import os

from celery import Celery
from celery.exceptions import Reject
from kombu import Exchange, Queue

RUN = os.environ["CH05_RUN"]  # unique names for this run's exchanges and queues
dlx = Exchange(f"dlx-{RUN}", type="direct")
dead = Queue(f"orders-dead-{RUN}", dlx, routing_key="dead")
orders = Queue(f"orders-{RUN}", Exchange(f"orders-{RUN}", type="direct"), routing_key="orders",
               queue_arguments={"x-dead-letter-exchange": dlx.name,
                                "x-dead-letter-routing-key": "dead"})

app = Celery("ch05_rabbit_tasks",
             broker=os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//"),
             backend=os.environ["CELERYLAB_BROKER_URL"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_queues=[orders],
    task_default_queue=orders.name,
    task_default_exchange=orders.exchange.name,
    task_default_routing_key="orders",
    task_acks_late=True,  # so that a Reject reaches the broker as a reject, not an ack
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)


@app.task
def parse_order(order):
    if order["currency"] not in ("EUR", "USD"):
        raise Reject(f"unknown currency {order['currency']!r}", requeue=False)
    return order["id"]


# %%
if rabbit_ok:
    import ch05_rabbit_tasks as rt
    from kombu import Connection

    with Connection(rabbitmq_url()) as conn:
        rt.dead.bind(conn).declare()  # the dead-letter exchange, its queue and the binding
        rt.orders.bind(conn).declare()
    rabbit_worker = stack.spawn_worker("ch05_rabbit_tasks", name="rabbit",
                                       queues=[rt.orders.name], concurrency=1)
    good = rt.parse_order.delay({"id": "order-7", "currency": "EUR"})
    bad = rt.parse_order.delay({"id": "order-8", "currency": "XBT"})
    print("good:", good.get(timeout=10))
    with Connection(rabbitmq_url()) as conn:
        inbox = conn.SimpleQueue(rt.dead.name, queue_opts={"no_declare": True})
        dead_letter = inbox.get(timeout=10)
        dead_letter.ack()
        x_death = dead_letter.headers["x-death"][0]
        print("dead-lettered:", dead_letter.headers["id"] == bad.id,
              {k: x_death[k] for k in ("reason", "queue", "count")})
        inbox.close()
    rabbit_worker.stop()
    with Connection(rabbitmq_url()) as conn:  # leave RabbitMQ as we found it
        for queue in (rt.orders, rt.dead):
            queue.bind(conn).delete()
        for exchange in (rt.orders.exchange, rt.dlx):
            exchange.bind(conn).delete()
    assert good.result == "order-7"
    assert dead_letter.headers["id"] == bad.id and dead_letter.headers["task"].endswith(
        "parse_order")
    assert x_death["reason"] == "rejected" and x_death["queue"] == rt.orders.name

# %% [markdown]
# RabbitMQ keeps the dead letter *with its original headers and body*, plus `x-death`: replay is
# publishing it back to the original exchange. On Redis you build the same thing yourself, as
# above; either way, a dead-letter queue nobody watches is just a slower way to lose messages
# (watch the dead-letter list's length like any queue's).
#
# ## Lab 5
#
# [labs/lab05_retries_and_dead_letters.ipynb](../labs/lab05_retries_and_dead_letters.ipynb) (your copy, in your workspace): write the retry policy and the dead-letter handling
# for a task calling a flaky dependency; the checker injects transient and permanent failures.

# %%
stack.stop()
