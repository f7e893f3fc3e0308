# %% [markdown]
# # Chapter 2 — Worker processes
#
# A `celery worker` is not one process. With the default **prefork** pool it is a *main process*
# that talks to the broker and hands tasks to *child processes* that run them. How many children,
# which pool, when children are replaced, what a time limit does to a child, what a shutdown does
# to the messages a worker holds: each is a setting, and each is a reliability decision. This
# chapter measures them.

# %%
import json
import time

import celerylab
from celerylab import plots
from celerylab.processes import pid_alive
from celerylab.recording import percentile, processes_at_once

stack = celerylab.start("ch02")
r = stack.redis
assert stack.health()

# %%
# %%writefile ch02_tasks.py
"""Chapter 2's tasks: CPU-bound, I/O-bound, memory-hungry and slow work."""

import os
import resource
import time

import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

BROKER = os.environ["CELERYLAB_BROKER_URL"]

app = Celery("ch02_tasks", broker=BROKER, backend=BROKER)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=False,  # the default: early ack (matters for shutdown, below)
    worker_prefetch_multiplier=4,  # the default: each worker holds up to 4 x concurrency
    worker_max_tasks_per_child=None,  # the default: children live forever (set per worker below)
    worker_max_memory_per_child=None,  # the default: no memory cap (set per worker below)
    task_soft_time_limit=None,  # the defaults: no time limits (set per task below)
    task_time_limit=None,
    broker_connection_retry_on_startup=True,
)

_hoard = []  # memory a task keeps: it stays with the child process


@app.task
def whoami():
    return os.getpid()


@app.task
def crunch(n):
    """CPU-bound: pure Python arithmetic, holds the GIL the whole time.

    Returns the CPU seconds its thread actually got."""
    cpu = time.thread_time()
    sum(i * i for i in range(n))
    return time.thread_time() - cpu


@app.task
def wait_io(seconds):
    """I/O-bound: waits (as on a network call) and uses no CPU."""
    time.sleep(seconds)


@app.task
def gated(gate):
    """Blocks (up to 20 s) until a token is pushed onto the Redis list `gate`."""
    redis.Redis.from_url(BROKER).blpop(gate, timeout=20)


@app.task
def hungry(mb):
    """Keeps `mb` MiB in the child (written to, so it is really resident)."""
    _hoard.append(bytearray(b"\x01") * (mb * 1024 * 1024))
    return os.getpid()


@app.task
def spike(mb):
    """Uses `mb` MiB for a moment, then frees it: the child's current size falls back."""
    block = bytearray(b"\x01") * (mb * 1024 * 1024)
    del block
    return os.getpid()


@app.task
def peak_rss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


@app.task(soft_time_limit=0.5, time_limit=5)
def polite(seconds):
    """Handles the soft limit: it gets a chance to clean up."""
    try:
        time.sleep(seconds)
        return "finished"
    except SoftTimeLimitExceeded:
        return "stopped at the soft limit and cleaned up"


@app.task(time_limit=0.5)
def stubborn(seconds):
    """Only a hard limit: the child running it is killed."""
    time.sleep(seconds)


# %% [markdown]
# ## Anatomy of a prefork worker
#
# Three children. Send nine tasks that return the pid that ran them, and ask the worker itself,
# over the broker's remote-control channel, what it is: `inspect().stats()` lists the pool's
# processes, `inspect().active()` what runs right now.

# %%
import ch02_tasks

worker = stack.spawn_worker("ch02_tasks", name="anatomy", concurrency=3)
results = [ch02_tasks.whoami.delay() for _ in range(9)]
ran_on = [res.get(timeout=10) for res in results]
children = worker.children()
print("main:", worker.pid, " children:", children, " tasks ran on:", sorted(set(ran_on)))
inspect = stack.control.control.inspect(destination=[worker.hostname], timeout=2)
stats = inspect.stats()[worker.hostname]
print("stats: pool", json.dumps(stats["pool"]["processes"]), "max-concurrency",
      stats["pool"]["max-concurrency"], "prefetch_count", stats["prefetch_count"])

# %%
assert len(children) == 3
assert set(ran_on) <= set(children) and worker.pid not in ran_on, "only children run tasks"
assert sorted(stats["pool"]["processes"]) == children
assert stats["prefetch_count"] == 3 * 4, "concurrency x worker_prefetch_multiplier"

# %%
running = ch02_tasks.wait_io.delay(1.0)
stack.started(running.id)
active = inspect.active()[worker.hostname]
print([(t["name"], t["id"][:8], t["worker_pid"]) for t in active])
assert [t["id"] for t in active] == [running.id] and active[0]["worker_pid"] in children
running.get(timeout=10)

# %% [markdown]
# ## What a busy worker holds
#
# `prefetch_count` caps the messages a worker holds *unacknowledged*. Under early ack a message is
# acknowledged when a child starts its task, so running tasks no longer count: a busy worker holds
# 4 x 3 = 12 reserved messages **plus** the 3 it runs. A task with a countdown (an ETA) waits
# inside the worker, not in the queue's list ("scheduled"; its message is in `unacked`), and the worker raises its prefetch count by one
# for each, so ETA tasks are held on top of the 12. Below, 18 tasks block until the notebook
# pushes tokens onto a Redis list (`gate`), and 2 tasks have a 10-minute countdown; then we count
# what the worker says it holds, and what Redis says.

# %%
h = worker.hostname
later = [ch02_tasks.whoami.apply_async(countdown=600) for _ in range(2)]
blocked = [ch02_tasks.gated.delay("gate") for _ in range(18)]


def settled():  # three running and the queue no longer shrinking
    depth = r.llen("celery")
    time.sleep(0.3)
    return len(inspect.active()[h]) == 3 and r.llen("celery") == depth


stack.wait_until(settled, 10, "the worker to fill its reserve")
held = {"running (active)": len(inspect.active()[h]),
        "reserved": len(inspect.reserved()[h]),
        "scheduled (ETA)": len(inspect.scheduled()[h]),
        "still in the Redis list": r.llen("celery"),
        "HLEN unacked": r.hlen("unacked"),
        "prefetch_count": inspect.stats()[h]["prefetch_count"]}
r.rpush("gate", *["go"] * len(blocked))  # let them all finish
stack.control.control.revoke([t.id for t in later])  # flag the countdown tasks: never run them
for name, n in held.items():
    print(f"{name:24} {n}")

# %%
assert held["running (active)"] == 3 and held["reserved"] == 4 * 3, "12 reserved PLUS 3 running"
assert held["scheduled (ETA)"] == 2 and held["prefetch_count"] == 4 * 3 + 2, "ETA on top"
assert held["still in the Redis list"] == 18 - 3 - 12
assert held["HLEN unacked"] == 12 + 2, "reserved and ETA messages are unacked; running ones not"
assert all(res.get(timeout=20) is None for res in blocked)

# %% [markdown]
# So "prefetch 4 x concurrency" undercounts what one early-ack worker keeps from the others.
# Chapter 6 counts the same under `acks_late` and measures what these numbers do to latency.
#
# ## Concurrency vs cores: the right pool depends on the work
#
# The same 16 CPU-bound tasks (`crunch`) and 16 I/O-bound tasks (`wait_io(0.1)`) run on four
# workers: `solo` (one task at a time, in the main process), `prefork` with 2 and 4 children
# (processes: real parallelism on this machine's cores), and `threads` with 4 (threads of one
# process: they share one GIL). Throughput = tasks / (last finish − first send). Each CPU-bound task
# also reports the CPU seconds it got, so we can see **how many cores the worker used** (total CPU
# seconds / the time from first start to last finish).
#
# A laptop is never idle, and two cores are only two when nothing else wants them. So first, a
# **reference**: the same burn in one plain process, then split over two, right now. Whatever the
# workers show is compared with that.

# %%
from celerylab.reference import cpu_parallelism

reference = cpu_parallelism(n=1_500_000, rounds=16)
print(f"one plain process {reference['serial s']:.2f} s, two {reference['parallel s']:.2f} s: "
      f"right now two processes get {reference['parallelism']:.2f}x the work of one done")

# %%
configs = {"solo -c 1": ("solo", 1), "prefork -c 2": ("prefork", 2),
           "prefork -c 4": ("prefork", 4), "threads -c 4": ("threads", 4)}
workers = {label: stack.worker("ch02_tasks", name=label.split()[0] + str(c), pool=pool,
                               concurrency=c, queues=[f"q-{pool}-{c}"])
           for label, (pool, c) in configs.items()}
stack.start_workers(*workers.values())


def throughput(task, args, queue, n=16):
    """(tasks/s, cores used: the tasks' CPU seconds / first start to last finish, processes that
    were running one of the tasks at the same moment)."""
    results = [task.apply_async(args, queue=queue) for _ in range(n)]
    done = stack.wait_for([x.id for x in results], timeout=60)
    rate = n / (max(a.finished for a in done) - min(a.sent for a in done))
    busy = max(a.finished for a in done) - min(a.started for a in done)
    return rate, sum(x.get(timeout=10) or 0 for x in results) / busy, processes_at_once(done)


measured = {}
for label, w in workers.items():
    cpu_rate, cores, at_once = throughput(ch02_tasks.crunch, (1_500_000,), w.queues[0])
    io_rate, _, _ = throughput(ch02_tasks.wait_io, (0.1,), w.queues[0])
    measured[label] = {"CPU-bound": cpu_rate, "I/O-bound": io_rate, "cores used": cores,
                       "processes at once": at_once}
    print(f"{label:13} CPU-bound {cpu_rate:6.1f} tasks/s on {cores:.2f} cores   "
          f"I/O-bound {io_rate:6.1f} tasks/s")

# %%
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 3, figsize=(14, 3))
for ax, kind, unit in zip(axes, ("CPU-bound", "I/O-bound", "cores used"),
                          ("tasks/s", "tasks/s", "cores used by the CPU-bound tasks"),
                          strict=True):
    plots.bars({k.replace(" -c ", "\n-c "): v[kind] for k, v in measured.items()}, kind, unit,
               ax=ax)

# %%
cores = {k: v["cores used"] for k, v in measured.items()}
at_once = {k: v["processes at once"] for k, v in measured.items()}
io = {k: v["I/O-bound"] for k, v in measured.items()}
# What holds on any machine, busy or not:
assert cores["threads -c 4"] < 1.15, "four threads take turns holding one GIL: one core at most"
assert cores["solo -c 1"] < 1.15
assert at_once["threads -c 4"] == at_once["solo -c 1"] == 1, "one process ran every task"
assert at_once["prefork -c 2"] == 2, "two child processes ran tasks at the same moment"
assert io["threads -c 4"] > 2.5 * io["solo -c 1"], "threads overlap waiting"
assert io["prefork -c 4"] > 2.5 * io["solo -c 1"]
# Two cores at work, judged against the reference: only when the machine has two to give. The
# kernel may still put both children on one core for a while (seen here under load): measure
# again, with a fresh reference beside it, before concluding anything.
prefork2 = workers["prefork -c 2"]
for _ in range(2):
    if cores["prefork -c 2"] > 1.2 or reference["parallelism"] < 1.6:
        break
    reference = cpu_parallelism(n=1_500_000, rounds=16)
    cores["prefork -c 2"] = throughput(ch02_tasks.crunch, (1_500_000,), prefork2.queues[0])[1]
if reference["parallelism"] >= 1.6:
    assert cores["prefork -c 2"] > 1.2, "two child processes ran on two cores at once"
    print(f"prefork -c 2 used {cores['prefork -c 2']:.2f} cores; two plain processes got "
          f"{reference['parallelism']:.2f}x")
else:
    print(f"The machine is too busy right now to show two cores at work: two plain processes got "
          f"only {reference['parallelism']:.2f}x the work of one done. prefork -c 2 used "
          f"{cores['prefork -c 2']:.2f} cores. Run the measurement again when it is quieter.")
stack.stop_workers()

# %% [markdown]
# CPU-bound work scales with *processes* (each runs on a core of its own when one is free; a
# process running pure-Python code uses at most one, since its threads share one GIL). I/O-bound
# work scales with *concurrency* of any kind, and threads are the cheap way to wait on many things
# at once. Measure your own tasks before picking.
#
# ## Child recycling
#
# Long-lived children accumulate leaks. `--max-tasks-per-child 2` replaces a child after two tasks;
# `--max-memory-per-child` (KiB) replaces it *after the task that crossed the limit* finishes. The
# limit is compared with the child's **peak** resident size (`ru_maxrss`, in billiard's
# `compat.py`), not its current size: a task that used a lot of memory and freed it still gets
# its child replaced.

# %%
recycled = stack.worker("ch02_tasks", name="recycled", concurrency=1, queues=["recycled"],
                        extra_args=["--max-tasks-per-child", "2"])
capped = stack.worker("ch02_tasks", name="capped", concurrency=1, queues=["capped"])
recycled.start()
pids = [ch02_tasks.whoami.apply_async(queue="recycled").get(timeout=10) for _ in range(6)]
print("pids for six tasks with --max-tasks-per-child 2:", pids)
assert len(set(pids)) == 3 and pids[0] == pids[1] and pids[2] == pids[3] != pids[1]

# %%
baseline = ch02_tasks.peak_rss_kib.apply_async(queue="recycled").get(timeout=10)
capped.extra_args = ["--max-memory-per-child", str(baseline + 60 * 1024)]  # baseline + 60 MiB
capped.start()
before = ch02_tasks.whoami.apply_async(queue="capped").get(timeout=10)
ate = ch02_tasks.hungry.apply_async((100,), queue="capped").get(timeout=20)
after = ch02_tasks.whoami.apply_async(queue="capped").get(timeout=20)
print(f"baseline {baseline / 1024:.0f} MiB, cap {capped.extra_args[1]} KiB; pids: before {before},"
      f" hungry ran on {ate}, next task on {after}")
assert before == ate, "the hungry task ran on the same child"
assert after != ate, "the child was replaced after the task that crossed the cap"

# %%
spiked = ch02_tasks.spike.apply_async((100,), queue="capped").get(timeout=20)
next_child = ch02_tasks.whoami.apply_async(queue="capped").get(timeout=20)
print(f"spike (100 MiB, freed before it returned) ran on {spiked}; next task on {next_child}")
assert spiked == after and next_child != spiked, "freed memory did not save it: the peak counts"
stack.stop_workers()

# %% [markdown]
# ## Time limits
#
# A **soft** limit raises `SoftTimeLimitExceeded` inside the task, which can clean up and return.
# A **hard** limit does not ask: the child is killed and replaced, and the result backend records a
# failure. The soft limit needs the prefork pool; the hard limit is enforced by prefork (and by
# gevent), not by the threads or solo pools.

# %%
limited = stack.spawn_worker("ch02_tasks", name="limited", concurrency=1, queues=["limits"])
child_before = limited.children()
soft = ch02_tasks.polite.apply_async((3,), queue="limits")
print("soft:", soft.get(timeout=10), "| state:", soft.state)
hard = ch02_tasks.stubborn.apply_async((3,), queue="limits")
try:
    hard.get(timeout=10)
except Exception as exc:
    print("hard:", type(exc).__name__, exc, "| state:", hard.state)
child_after = stack.wait_until(lambda: [p for p in limited.children() if p not in child_before],
                               10, "a replacement child")
print("children before", child_before, "after", child_after)

# %%
assert soft.state == "SUCCESS" and soft.result == "stopped at the soft limit and cleaned up"
meta = json.loads(r.get(f"celery-task-meta-{hard.id}"))
assert hard.state == "FAILURE" and meta["result"]["exc_type"] == "TimeLimitExceeded"
assert not pid_alive(child_before[0]), "the hard limit killed the child that ran the task"
assert len(limited.children()) == 1, "and the pool replaced it"
limited.stop()

# %% [markdown]
# ## Shutdown: warm vs cold, counted in Redis
#
# One child, prefetch multiplier 4, early ack. Send one 2 s task and three more: the worker runs
# the first and *reserves* the others. Then stop it:
#
# * **warm** (SIGTERM): the running task finishes; the reserved messages go back to the queue;
# * **cold** (SIGQUIT): the running task is abandoned. With early ack its message was already
#   acknowledged, so it is *lost*; the reserved ones still go back.

# %%
def shutdown_experiment(cold):
    r.delete("shutdown")
    w = stack.spawn_worker("ch02_tasks", name="cold" if cold else "warm", concurrency=1,
                           queues=["shutdown"], prefetch_multiplier=4)
    first = ch02_tasks.wait_io.apply_async((2,), queue="shutdown")
    rest = [ch02_tasks.wait_io.apply_async((0.1,), queue="shutdown") for _ in range(3)]
    stack.started(first.id)
    stack.wait_until(lambda: r.llen("shutdown") == 0, 5, "the worker to reserve the rest")
    w.cold_stop() if cold else w.stop()
    return {"running task": first.state, "back in queue": r.llen("shutdown"),
            "reserved ids back": sorted(json.loads(m)["headers"]["id"]
                                        for m in r.lrange("shutdown", 0, -1))
            == sorted(x.id for x in rest)}


warm = shutdown_experiment(cold=False)
cold = shutdown_experiment(cold=True)
plots.table([{"shutdown": "warm (TERM)", **warm}, {"shutdown": "cold (QUIT)", **cold}])

# %%
assert warm == {"running task": "SUCCESS", "back in queue": 3, "reserved ids back": True}
assert cold["running task"] == "RETRY" and cold["back in queue"] == 3
assert cold["reserved ids back"]
assert not r.exists("unacked") or r.hlen("unacked") == 0

# %% [markdown]
# The cold shutdown's running task is gone: no message in the queue, none in `unacked`. Worse, the
# result backend says `RETRY` (Celery records the abandoned task that way), yet no message exists
# that could ever run it again. Chapter 4 makes that task survive (`acks_late`) and shows
# what *that* costs.
#
# ## Lab 2
#
# [labs/lab02_pool_and_concurrency.ipynb](../labs/lab02_pool_and_concurrency.ipynb) (your copy, in your workspace): choose pools and concurrency for a mixed workload
# that must reach a throughput target. **Next:** Chapter 3 — queue routing.

# %%
stack.stop()
