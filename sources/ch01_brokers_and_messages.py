# %% [markdown]
# # Chapter 1 — Brokers and messages
#
# A broker is not magic: with Redis it is a handful of lists, hashes and sets. Knowing exactly what
# sits in Redis, and when, is how you reason about lost and duplicated work later. In this chapter
# you will look at a message in Redis before any worker exists, decode it, watch what a worker holds
# while it runs a task, see a message come back after its worker vanished (and while its task
# still ran), and restart the broker cleanly and by a crash, with and without persistence.

# %%
import base64
import json
import time

import redis

import celerylab
from celerylab import plots, widgets

stack = celerylab.start("ch01")
r = stack.redis  # a redis-py client on this notebook's own Redis
assert stack.health()

# %% [markdown]
# ## This chapter's tasks
#
# The settings below are the ones this chapter looks at. Celery talks to brokers through
# **kombu**, its messaging library: the Redis transport (how a queue becomes Redis lists and keys)
# is kombu's, and so are the `broker_transport_options`. They shrink the **visibility timeout**
# from an hour to 5 seconds so you can watch it act (more on it below). A message that a worker
# took but has not acknowledged within that time is put back on its queue by a **restore sweep**:
# kombu, inside a worker, looks for such messages every `unacked_restore_interval` seconds, and
# kombu 5.7 scans only on every `unacked_restore_throttle`-th look; both are lowered here so the
# timeout is honoured to the second.

# %%
# %%writefile ch01_tasks.py
"""Chapter 1's tasks."""

import os
import time

from celery import Celery

BROKER = os.environ["CELERYLAB_BROKER_URL"]

app = Celery("ch01_tasks", broker=BROKER, backend=BROKER)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,  # seconds a result key lives
    task_default_queue="celery",  # the default queue's name (and the Redis list's)
    task_acks_late=False,  # the default; `hold` below acknowledges late
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "visibility_timeout": 5,  # default 3600 s: unacked messages come back after this
        "unacked_restore_interval": 1,  # kombu 5.7: look for them every second (default 10)...
        "unacked_restore_throttle": 1,  # ...and scan on every look (default: every 10th)
    },
)


@app.task
def add(x, y):
    return x + y


@app.task(bind=True, acks_late=True)
def hold(self, seconds):
    """Runs for `seconds`, acknowledging its message only when it returns."""
    time.sleep(seconds)
    return {"redelivered": bool(self.request.delivery_info.get("redelivered"))}


@app.task
def hold_early(seconds):
    """The same work, acknowledged early (when a pool child starts it)."""
    time.sleep(seconds)


# %% [markdown]
# ## A message with nobody to take it
#
# No worker runs yet. Sending a task only *publishes a message*: kombu `LPUSH`es it onto a Redis
# list named after the queue (`celery`, the default). Look at every key Redis now holds:

# %%
import ch01_tasks

result = ch01_tasks.add.delay(2, 3)
for key in sorted(r.keys("*")):
    if not key.startswith(b"celerylab:"):  # the course's own recordings
        print(f"{key!r:45} {r.type(key).decode():6}")
print("LLEN celery =", r.llen("celery"))

# %%
assert r.type("celery") == b"list" and r.llen("celery") == 1
assert r.smembers("_kombu.binding.celery"), "kombu records how the exchange routes to the queue"
assert not r.exists(f"celery-task-meta-{result.id}"), "no result yet: nobody ran it"
# PENDING means "no result stored", not "queued": Celery says it for an id it never saw, too.
assert result.state == "PENDING" and ch01_tasks.app.AsyncResult("no-such-task").state == "PENDING"

# %% [markdown]
# `_kombu.binding.celery` is kombu's routing table for the exchange `celery` (a set: which
# queues a message sent to that exchange with which routing key goes to; `_kombu.binding.*` keys
# stay after the queue is empty, and have no expiry). The message itself
# sits in the list. Read it *without consuming it*: `LINDEX celery -1` is the oldest message, the
# one a worker would take next (producers push on the left, workers pop on the right).

# %%
envelope = json.loads(r.lindex("celery", -1))
print(json.dumps({k: v for k, v in envelope.items() if k != "body"}, indent=1)[:1500])

# %% [markdown]
# The **headers** say what to run (`task`, `id`, `retries`, `eta`, ...), the **properties** how it
# was delivered. The **body** is base64 of JSON: `[args, kwargs, embed]`, where `embed` carries
# what Celery attaches to a call (`callbacks`, `errbacks`, `chain`, `chord`). Notice what Celery
# does *not* put there: an enqueue time. The `celerylab_sent_at` header printed above is not
# Celery's: it is the course's recorder (`celerylab.recording`, a `before_task_publish` signal
# handler) stamping each message as it is published, so the lessons can measure waits. Celery
# itself has no need for one (it routes and runs messages; measuring queue lag is left to you),
# and the course's queue-lag lessons build on this stamp.

# %%
args, kwargs, embed = json.loads(base64.b64decode(envelope["body"]))
print("args:", args, " kwargs:", kwargs, " embed:", embed)
headers = envelope["headers"]
assert headers["task"] == "ch01_tasks.add" and headers["id"] == result.id
assert args == [2, 3] and kwargs == {}
assert envelope["content-type"] == "application/json"
assert envelope["properties"]["body_encoding"] == "base64"
assert "celerylab_sent_at" in headers, "the course's recorder stamped it"

# %% [markdown]
# ## A worker takes it; the result lands in the backend
#
# Start a worker (one pool child, prefetch 1: it holds at most one message beyond the one it
# runs). It `BRPOP`s the message, runs it, and the result backend writes
# `celery-task-meta-<id>`: a string of JSON with a time to live of `result_expires`.

# %%
worker = stack.spawn_worker("ch01_tasks", name="w1", concurrency=1, prefetch_multiplier=1)
print(result.get(timeout=10))
meta_key = f"celery-task-meta-{result.id}"
print(r.get(meta_key).decode(), "\nTTL:", r.ttl(meta_key), "s")

# %%
assert r.llen("celery") == 0
assert json.loads(r.get(meta_key))["status"] == "SUCCESS"
assert 3500 < r.ttl(meta_key) <= 3600

# %% [markdown]
# ## What a worker holds while it works: `unacked`
#
# Between taking a message and *acknowledging* it, a worker keeps a copy in the hash `unacked`
# (delivery tag → message), with its fetch time in the sorted set `unacked_index`. When the copy is
# removed depends on the acknowledgement mode:
#
# * `acks_late=True` (`hold`): acknowledged when the task *returns*: the copy stays while it runs;
# * the default, early ack (`hold_early`): acknowledged when a child *starts* it: gone at once.

# %%
late = ch01_tasks.hold.delay(1.5)
stack.started(late.id)
held_late = r.hlen("unacked")
late.get(timeout=10)
early = ch01_tasks.hold_early.delay(1.5)
stack.started(early.id)
held_early = r.hlen("unacked")
early.get(timeout=10)
print(f"unacked while running: acks_late -> {held_late}, early ack -> {held_early}; "
      f"after both finished -> {r.hlen('unacked')}")

# %%
assert (held_late, held_early, r.hlen("unacked")) == (1, 0, 0)

# %% [markdown]
# ## Visibility timeout: a message comes back when its worker vanishes
#
# Redis has no idea whether a worker is alive. kombu's answer is the **visibility timeout**: a
# message that stays unacknowledged longer than that is put back on its queue and delivered again,
# marked `redelivered`. Here: a `hold` task starts, the whole worker is SIGKILLed mid-task (a crash,
# not a shutdown), a new worker starts, and the message returns about 5 s after it was first taken.

# %%
job = ch01_tasks.hold.delay(1.0)
first = stack.started(job.id)
worker.kill()
killed_at = time.time()
print(f"worker killed; queue length {r.llen('celery')}, unacked {r.hlen('unacked')}")
stranded = (r.llen("celery"), r.hlen("unacked"))

rescuer = stack.spawn_worker("ch01_tasks", name="w2", concurrency=1, prefetch_multiplier=1)
outcome = job.get(timeout=30)
attempts = stack.wait_for([job.id])
second = attempts[-1]
print(f"second delivery started {second.started - first.received:.1f} s after the first fetch,"
      f" on {second.host}; task saw redelivered={outcome['redelivered']}")
plots.table(attempts)

# %%
assert stranded == (0, 1), "after the crash the message is in neither the queue nor done"
assert len(attempts) == 2 and second.host == rescuer.hostname
assert outcome == {"redelivered": True} and second.redelivered
assert second.started - first.received >= 5 * 0.95, "not before the visibility timeout"
assert second.started - first.received < 5 + 10, "and soon after it"

# %% [markdown]
# ## A task that runs longer than the visibility timeout
#
# Nothing needs to crash for the timeout to act: kombu cannot tell a dead worker from a slow task.
# Whether a long task is delivered again depends on *when* its message is acknowledged. Under
# `acks_late` the message stays in `unacked` while the task runs, so after 5 s the sweep puts it
# back and another child starts a second copy *while the first still runs*. Under early ack the
# message was acknowledged when the task started: there is nothing left to restore. Both run 7 s
# side by side here, on a worker with three children (queue `long`).

# %%
long_worker = stack.spawn_worker("ch01_tasks", name="w3", queues=("long",), concurrency=3,
                                 prefetch_multiplier=1)
late_long = ch01_tasks.hold.apply_async((7,), queue="long")
early_long = ch01_tasks.hold_early.apply_async((7,), queue="long")
early_long.get(timeout=30)


def both_copies_finished():
    runs = stack.records([late_long.id])
    return runs if len(runs) == 2 and all(a.finished for a in runs) else None


late_runs = stack.wait_until(both_copies_finished, timeout=20, what="both copies to finish")
early_runs = stack.records([early_long.id])
plots.table(late_runs + early_runs)
print("stored result:", late_long.get(timeout=5))

# %%
assert len(early_runs) == 1, "early ack: acknowledged at start, never delivered again"
assert len(late_runs) == 2 and late_runs[1].redelivered, "acks_late: delivered again..."
assert late_runs[1].started < late_runs[0].finished, "...while the first copy was still running"
assert [a.state for a in late_runs] == ["SUCCESS", "SUCCESS"], "both copies ran to the end"
assert late_long.get() == {"redelivered": False}, "the backend kept the first copy's SUCCESS"

# %% [markdown]
# Both copies succeeded, yet the result backend shows only the first: Celery's backend does not
# overwrite a stored SUCCESS (`celery/backends/base.py`), so the second copy's work is invisible
# there, and any side effect it had happened twice.
#
# Two copies of one task ran at once: the default one-hour timeout is there so that this needs a
# task (or a countdown, chapter 4) longer than an hour. Keep the timeout above your longest task
# *and* your longest countdown; and a task that can be delivered twice must be safe to run twice
# (chapter 4).
#
# ## Broker restart: what survives depends on how Redis persists, and how it stops
#
# The course's Redis runs with `--save ''` (no snapshots) and no append-only file: fine for a
# classroom, wrong for production. A stock `redis-server` is different: its default **save
# points** (`3600 1 300 100 60 10000`: snapshot after N seconds if at least M keys changed) also
# make it write an RDB snapshot on a *clean* shutdown (SIGTERM, `SHUTDOWN`), and load it when it
# starts. So a clean restart keeps queued messages even without AOF; a crash (SIGKILL, a power
# cut) loses whatever the last snapshot missed, unless the append-only file (AOF) logged each
# write (`appendfsync always` here; with `everysec` a power or OS failure may lose up to a second,
# a killed process nothing). Four scratch Redis
# servers of the course's own each get 10 messages and are restarted:

# %%
def restart_with_queued(save, appendonly, crash, n=10):
    """Queue n messages on a scratch Redis, restart it (SIGTERM, or SIGKILL if crash), count."""
    with stack.scratch_redis(appendonly=appendonly, save=save) as scratch:
        with ch01_tasks.app.connection_for_write(scratch.url) as conn:
            for i in range(n):
                ch01_tasks.add.apply_async((i, i), connection=conn)
        before = redis.Redis.from_url(scratch.url).llen("celery")
        scratch.restart(crash=crash)
        after = redis.Redis.from_url(scratch.url).llen("celery")
    return before, after


DEFAULT_SAVE = None  # keep redis-server's own default save points
survival = {
    "default save points, clean restart": restart_with_queued(DEFAULT_SAVE, False, crash=False),
    "--save '', clean restart": restart_with_queued("", False, crash=False),
    "default save points, SIGKILL": restart_with_queued(DEFAULT_SAVE, False, crash=True),
    "AOF always, SIGKILL": restart_with_queued("", True, crash=True),
}
for setting, (before, after) in survival.items():
    print(f"{setting:36} queued before: {before:2}   after: {after:2}")
plots.bars({k: v[1] for k, v in survival.items()}, "Messages left after a broker restart",
           "messages");

# %%
assert survival["default save points, clean restart"] == (10, 10), "RDB written on shutdown"
assert survival["--save '', clean restart"] == (10, 0)
assert survival["default save points, SIGKILL"] == (10, 0), "no save point reached yet"
assert survival["AOF always, SIGKILL"] == (10, 10)

# %% [markdown]
# For a production broker: AOF on (`appendonly yes`, `appendfsync everysec` or `always`), and
# `maxmemory-policy noeviction`, so Redis refuses writes when full instead of evicting a queue.
#
# %% [markdown]
# ## Try it: fill a queue
#
# Send messages to a queue nobody consumes, then look at both ends of the list. (The control's
# logic is `celerylab.widgets.send_and_inspect`; here it runs once without the buttons.)

# %%
report = widgets.send_and_inspect(ch01_tasks.add, r, 5, queue="parked")
print({k: v for k, v in report.items() if k != "ids"})
assert report["depth"] == 5
assert (report["oldest id"], report["newest id"]) == (report["ids"][0], report["ids"][-1])
widgets.queue_explorer(ch01_tasks.add, r, queue="parked")

# %% [markdown]
# ## Lab 1
#
# Open [labs/lab01_pending_messages.ipynb](../labs/lab01_pending_messages.ipynb) (your copy, in your workspace): write a function that lists a queue's pending
# messages (task, id, args, retries, eta) without consuming them. Its checker tells you when it
# is right. **Next:** Chapter 2 — worker processes.

# %%
stack.stop()
