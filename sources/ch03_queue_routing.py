# %% [markdown]
# # Chapter 3 — Queue routing
#
# A queue is a line. Anything that waits in the same line as a slow task waits for the slow task:
# that is **head-of-line blocking**, and it is why a checkout confirmation can take 30 seconds on
# the day somebody exports a big report. Routing puts different kinds of work in different lines,
# served by different workers, so a slow, a memory-hungry and a latency-sensitive task cannot hurt
# each other. This chapter routes tasks, measures the blocking, and looks at Redis priorities.

# %%
import json

import celerylab
from celerylab import plots, widgets
from celerylab.processes import pid_alive

stack = celerylab.start("ch03")
r = stack.redis
assert stack.health()

# %% [markdown]
# ## Routes, written out
#
# `task_routes` is read by the **producer**: it decides which queue a message goes to when it is
# sent. It may be a dict (exact names or globs), a function, or a list of those: the first router
# that returns something wins. Tasks no router claims go to `task_default_queue`.

# %%
# %%writefile ch03_tasks.py
"""Chapter 3's tasks: latency-sensitive, slow, memory-hungry, and reports."""

import os
import time

from celery import Celery

BROKER = os.environ["CELERYLAB_BROKER_URL"]


def route_checkout(name, args, kwargs, options, task=None, **kw):
    """A function router: decides per call, from the arguments."""
    if name == "ch03_tasks.checkout" and kwargs.get("vip"):
        return {"queue": "fast"}
    return None  # not mine: ask the next router


ROUTES = {
    "ch03_tasks.lookup": {"queue": "fast"},  # exact task name
    "ch03_tasks.resize_image": {"queue": "slow"},
    "ch03_tasks.bulk_import": {"queue": "bulky"},
    "ch03_tasks.report_*": {"queue": "reports"},  # a glob
}

app = Celery("ch03_tasks", broker=BROKER, backend=BROKER)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_routes=(route_checkout, ROUTES),  # tried in order; the first answer wins
    task_default_queue="celery",  # where unrouted tasks go
    task_create_missing_queues=True,  # the default: a route may name any queue
    task_acks_late=False,  # the default (early ack)
    worker_prefetch_multiplier=4,  # the default
    broker_transport_options={"priority_steps": [0, 3, 6, 9]},  # kombu's default steps on Redis
    broker_connection_retry_on_startup=True,
)

_hoard = []


@app.task
def lookup(x):
    """Latency-sensitive: a user waits for it."""
    return x


@app.task
def resize_image(seconds):
    """Slow."""
    time.sleep(seconds)


@app.task
def bulk_import(mb):
    """Memory-hungry: keeps `mb` MiB in the child process."""
    _hoard.append(bytearray(b"\x01") * (mb * 1024 * 1024))
    return os.getpid()


@app.task
def report_daily():
    return "daily"


@app.task
def report_weekly():
    return "weekly"


@app.task
def checkout(order_id, vip=False):
    return order_id


@app.task
def job(seconds):
    time.sleep(seconds)


@app.task(acks_late=True)
def job_late(seconds):
    time.sleep(seconds)


# %% [markdown]
# No worker runs yet, so every message stays where its route put it. Send one of each and find
# it in Redis: each queue is a list named after it.

# %%
import ch03_tasks

sent = {
    "lookup (dict route)": ch03_tasks.lookup.delay(1),
    "resize_image (dict route)": ch03_tasks.resize_image.delay(0.1),
    "report_daily (glob route)": ch03_tasks.report_daily.delay(),
    "report_weekly (glob route)": ch03_tasks.report_weekly.delay(),
    "checkout vip=True (function route)": ch03_tasks.checkout.delay(1, vip=True),
    "checkout (no route)": ch03_tasks.checkout.delay(2),
    "resize_image, queue='urgent' (override)": ch03_tasks.resize_image.apply_async(
        (0.1,), queue="urgent"),
}


def where_messages_are():
    """{task id: queue} for every message waiting in a Redis list."""
    found = {}
    for key in r.scan_iter(_type="LIST"):
        if key.startswith(b"celerylab:"):
            continue
        for raw in r.lrange(key, 0, -1):
            found[json.loads(raw)["headers"]["id"]] = key.decode()
    return found


landed = where_messages_are()
plots.table([{"message": label, "queue (Redis list)": landed.get(res.id)}
             for label, res in sent.items()])

# %%
assert [landed[res.id] for res in sent.values()] == [
    "fast", "slow", "reports", "reports", "fast", "celery", "urgent"]

# %% [markdown]
# A worker consumes only the queues it is told to (`--queues`, `-Q`). A worker for `reports`
# drains that list and leaves every other one alone:

# %%
reporter = stack.spawn_worker("ch03_tasks", name="reporter", queues=["reports"], concurrency=1)
reports = [res.id for label, res in sent.items() if landed[res.id] == "reports"]
ran = stack.wait_for(reports, timeout=10)
left = {q: r.llen(q) for q in ("fast", "slow", "celery", "urgent")}
print("the reporter ran:", sorted({a.name for a in ran}), "| still waiting:", left)
reporter.stop()
assert {a.host for a in ran} == {reporter.hostname}
assert left == {"fast": 2, "slow": 1, "celery": 1, "urgent": 1}, "the other queues were left alone"
r.delete("fast", "slow", "celery", "urgent");

# %% [markdown]
# ## Head-of-line blocking, measured
#
# Four workers, started together:
#
# * `shared` (`-c 2`) serves one queue, `shared`, for everything;
# * `fast` (`-c 1`) serves `fast`; `slow` (`-c 2`) serves `slow`;
# * `bulky` (`-c 1`, `--max-memory-per-child`) serves `bulky` (used further down).
#
# Experiment: six 1 s `resize_image` tasks, then twenty `lookup`s. Once with everything in the
# `shared` queue, once with each kind in its own queue. Latency = sent to finished. A third run,
# the twenty lookups alone with nothing else queued, is the reference: what a lookup costs on this
# machine right now, however busy it is.

# %%
MAX_MEMORY_KIB = 120 * 1024  # replace a bulky child once it holds more than 120 MiB
workers = {
    "shared": stack.worker("ch03_tasks", name="shared", queues=["shared"], concurrency=2),
    "fast": stack.worker("ch03_tasks", name="fast", queues=["fast"], concurrency=1),
    "slow": stack.worker("ch03_tasks", name="slow", queues=["slow"], concurrency=2),
    "bulky": stack.worker("ch03_tasks", name="bulky", queues=["bulky"], concurrency=1,
                          extra_args=["--max-memory-per-child", str(MAX_MEMORY_KIB)]),
}
stack.start_workers(*workers.values())
plots.table(stack.processes())

# %%
shared = widgets.latency_experiment(stack, ch03_tasks.lookup, ch03_tasks.resize_image,
                                    fast_queue="shared", slow_queue="shared")
isolated = widgets.latency_experiment(stack, ch03_tasks.lookup, ch03_tasks.resize_image,
                                      fast_queue="fast", slow_queue="slow")
alone = widgets.latency_experiment(stack, ch03_tasks.lookup, ch03_tasks.resize_image,
                                   fast_queue="fast", slow_queue="slow", n_slow=0)
for name, res in (("one shared queue", shared), ("separate queues", isolated),
                  ("lookups alone", alone)):
    print(f"{name:17} lookup latency p50 {res['p50']:.3f} s   p95 {res['p95']:.3f} s")
plots.latency_distributions({"one shared queue": shared["latencies"],
                             "separate queues": isolated["latencies"],
                             "lookups alone": alone["latencies"]},
                            "lookup latency (sent to finished)", log=True);

# %%
plots.timeline(shared["attempts"], title="Shared queue: the lookups wait behind the resizes");

# %%
# Relative claims, measured side by side: a busy machine slows all three runs alike.
assert shared["p50"] > 1.0, "in the shared queue, lookups wait at least one 1 s resize"


def did_not_wait(p95):
    """Well under a resize's wait (half the shared median; here it is usually ten times under),
    or, on a busy machine, as fast as the lookups alone (measured just after, in this run)."""
    return p95 * 2 < shared["p50"] or p95 <= 2 * alone["p95"]


if isolated["p95"] * 10 >= shared["p50"]:
    print(f"This machine is too busy to show a tenfold gap right now (the lookups alone took "
          f"p95 {alone['p95']:.2f} s, on their own queue {isolated['p95']:.2f} s). The claim "
          "judged is 'well under a resize, or as fast as alone'.")
assert did_not_wait(isolated["p95"]), "on their own queue, lookups do not wait for the resizes"
assert {a.host for a in isolated["attempts"] if a.name.endswith(".lookup")} == {
    workers["fast"].hostname}, "and only the fast worker ran them"
# They did not get slower to *run*: nearly all of their latency was waiting (sent to started).
waited = sum(a.wait for a in shared["attempts"] if a.name.endswith(".lookup"))
assert waited > 0.9 * sum(shared["latencies"]), "in the shared queue, latency is waiting"
prefetch = stack.control.control.inspect([workers["shared"].hostname], timeout=2).stats()
assert prefetch[workers["shared"].hostname]["prefetch_count"] == 4 * 2, "multiplier x concurrency"

# %% [markdown]
# The lookups did not get slower to *run*; they waited in line: over 90% of their latency was
# time between being sent and being started. With `-c 2` and the default prefetch (a prefetch
# count of 4 × 2 = 8 messages, as `inspect().stats()` reported), the worker had taken the resizes
# first, and a lookup could only start when a child became free.
#
# ## Isolating the three kinds, with the routes
#
# Now no queue is forced: the producer's `task_routes` send `lookup` to `fast`, `resize_image` to
# `slow` and `bulk_import` to `bulky`. The `bulky` worker has one child and a memory cap, so a
# 150 MiB import cannot pile up in a long-lived process: its child is replaced after each import.

# %%
slow = [ch03_tasks.resize_image.delay(1.0) for _ in range(4)]
bulky = [ch03_tasks.bulk_import.delay(150) for _ in range(2)]
fast = [ch03_tasks.lookup.delay(i) for i in range(20)]
mix = stack.wait_for([x.id for x in slow + bulky + fast], timeout=30)
by_id = {a.id: a for a in mix}
lookups = [by_id[x.id] for x in fast]
import_pids = [x.get(timeout=10) for x in bulky]
p95 = plots.percentile([a.latency for a in lookups], 95)
print(f"lookup p95 {p95:.3f} s; lookups ran on {sorted({a.host for a in lookups})}; "
      f"imports ran on children {import_pids}")
gone = stack.wait_until(
    lambda: (kids := workers["bulky"].children()) and not set(import_pids) & set(kids), 10,
    "the bulky worker to have a fresh child")
print("bulky children now:", workers["bulky"].children())

# %%
assert did_not_wait(p95) and {a.host for a in lookups} == {workers["fast"].hostname}
assert {by_id[x.id].queue for x in slow} == {"slow"}
assert len(set(import_pids)) == 2, "each import got a fresh child"
assert not any(pid_alive(p) for p in import_pids), "the children that held an import are gone"
assert len(workers["bulky"].children()) == 1, "and the pool has a fresh one"

# %% [markdown]
# ## Try it: move the tasks between queues
#
# Pick which queue the lookups and the resizes go to and run the experiment again; each run adds a
# column to the plot. (The logic is `celerylab.widgets.latency_experiment`, used above.)

# %%
widgets.routing_explorer(stack, ch03_tasks.lookup, ch03_tasks.resize_image,
                         ["fast", "shared", "slow"])

# %% [markdown]
# ## Priorities on Redis
#
# Redis has no priority queues, so kombu emulates them with one list per priority step
# (`priority_steps`, default `[0, 3, 6, 9]`): step 0 is the queue's own list `<queue>`, the others
# are *sub-lists* named `<queue>\x06\x16<step>`, and workers pop the lists in step order. **0 is
# the highest priority** (some kombu docstrings say the opposite), a priority is rounded down to its
# step, and a message *without* a priority counts as 0: it shares the step-0 list, first in first
# out, with priorities 0-2, and outranks only 3-9.

# %%
for priority in (None, 0, 3, 5, 9):
    ch03_tasks.job.apply_async((0,), queue="prio-demo", priority=priority)
lists = {key.decode(errors="replace").replace("\x06\x16", r"\x06\x16"): r.llen(key)
         for key in sorted(r.scan_iter("prio-demo*"))}
print(lists)
assert lists == {"prio-demo": 2, r"prio-demo\x06\x163": 2, r"prio-demo\x06\x169": 1}
r.delete(*r.keys("prio-demo*"));

# %% [markdown]
# **The tie, live.** Five messages, sent in this order: priority 3, none, 2, none, 0. Then one
# worker (one child, `acks_late`, prefetch 1: it takes one message at a time) starts on the queue.
# Priorities 0 and 2 and "none" all sit in the bare list, so they come out first in first out, in
# the order they were sent; priority 3 waits for all of them.

# %%
sent_order = {"priority 3": 3, "none (1st)": None, "priority 2": 2, "none (2nd)": None,
              "priority 0": 0}
tie = {label: ch03_tasks.job_late.apply_async((0.01,), queue="prio-tie", priority=p).id
       for label, p in sent_order.items()}
tie_worker = stack.spawn_worker("ch03_tasks", name="tie", queues=["prio-tie"], concurrency=1,
                                prefetch_multiplier=1)
runs = sorted(stack.wait_for(tie.values(), timeout=20), key=lambda a: a.started)
tie_worker.stop()
label_of = {task_id: label for label, task_id in tie.items()}
ran = [label_of[a.id] for a in runs]
print("ran in the order:", ran)
assert ran == ["none (1st)", "priority 2", "none (2nd)", "priority 0", "priority 3"]

# %% [markdown]
# **Prefetch defeats priority.** A worker runs a 1 s task; four low-priority (9) tasks arrive,
# then two high-priority (0) ones. With the default prefetch the worker has already *reserved*
# the low ones: it runs them first, whatever their priority. With `acks_late` and a prefetch
# multiplier of 1 it holds only the task it runs, so the high ones are still in Redis, where the
# priority order applies.

# %%
def priority_run(acks_late, multiplier):
    task = ch03_tasks.job_late if acks_late else ch03_tasks.job
    w = stack.spawn_worker("ch03_tasks", name=f"prio{multiplier}", queues=["prio"],
                           concurrency=1, prefetch_multiplier=multiplier)
    blocker = task.apply_async((1.0,), queue="prio", priority=0)
    stack.started(blocker.id)
    low = [task.apply_async((0.05,), queue="prio", priority=9).id for _ in range(4)]
    if multiplier > 1:
        stack.wait_until(lambda: r.llen("prio\x06\x169") == 0, 5, "the worker to reserve them")
    reserved = len(stack.control.control.inspect([w.hostname], timeout=2).reserved()[w.hostname])
    high = [task.apply_async((0.05,), queue="prio", priority=0).id for _ in range(2)]
    runs = sorted(stack.wait_for(low + high, timeout=20), key=lambda a: a.started)
    w.stop()
    return reserved, ["high" if a.id in high else "low" for a in runs]


prefetched = priority_run(acks_late=False, multiplier=4)
one_at_a_time = priority_run(acks_late=True, multiplier=1)
plots.table([{"worker": "early ack, multiplier 4", "low tasks reserved": prefetched[0],
              "order run": " ".join(prefetched[1])},
             {"worker": "acks_late, multiplier 1", "low tasks reserved": one_at_a_time[0],
              "order run": " ".join(one_at_a_time[1])}])

# %%
assert prefetched == (4, ["low"] * 4 + ["high"] * 2)
assert one_at_a_time == (0, ["high"] * 2 + ["low"] * 4)

# %% [markdown]
# Priorities are a weak tool on Redis: they only order what is still in the broker. Separate
# queues with dedicated workers are the reliable way to keep urgent work fast.
#
# ## Lab 3
#
# [labs/lab03_routing_layout.ipynb](../labs/lab03_routing_layout.ipynb) (your copy, in your workspace): route a mixed workload and lay out the workers so the
# latency-sensitive tasks meet a p95 target while slow and memory-hungry work runs.
# **Next:** Chapter 4 — delivery guarantees and idempotency.

# %%
stack.stop()
