# %% [markdown]
# # Chapter 0 — Setup and the big picture
#
# **The one idea of this course: background work is a reliability tool.** A web request should do
# what the user is waiting for and hand everything else to a queue, where it can be retried,
# routed, watched and scaled on its own.
#
# Four parts make that work, and every one of them runs for real on your machine in this notebook:
#
# | part | here | what it does |
# |---|---|---|
# | **producer** | this notebook's kernel | turns a function call into a *message* and publishes it |
# | **broker** | a `redis-server` process | holds messages in lists until a worker takes them |
# | **worker** | a `celery worker` process and its pool children | takes messages, runs the task code |
# | **result backend** | the same Redis | stores each task's outcome under a key |
#
# Run the cells from top to bottom (Shift-Enter). Nothing here is simulated: the pids, timings
# and plots are what your machine just did.

# %% [markdown]
# ## Start this notebook's stack
#
# `celerylab.start("ch00")` starts a private Redis for this notebook on a free `127.0.0.1` port
# (persistence off, and `maxmemory-policy noeviction`: when memory runs out Redis refuses new
# writes rather than evicting keys, because an evicted key here would be a lost queue), so
# nothing here can touch another Redis.
# (With `REDIS_URL` set, as under Docker compose, it claims a database of that Redis instead, one
# that is empty or already the course's, never database 0: still nothing of anyone else's.)
# `stack.health()` says what runs and, when something does not, what to do about it.

# %%
import statistics
import time

import celerylab
from celerylab import plots, widgets
from celerylab.recording import processes_at_once

stack = celerylab.start("ch00")
assert stack.health()

# %% [markdown]
# ## The task module
#
# A worker is *another process*: it cannot see functions defined in this notebook. Task code lives
# in a module both sides import. The cell below writes `ch00_tasks.py` next to this notebook. Every
# setting this chapter relies on is written out, even where it equals Celery's default: explicit
# defaults are the first habit of reliable background work. Two of them need a word now (chapter 4
# measures the first, chapter 3 shows the second at work): a worker **acknowledges** a message to
# tell the broker it may forget it (here as soon as a pool child starts the task), and it
# **prefetches**: takes messages from the broker ahead of time, holding up to
# `worker_prefetch_multiplier` × the number of children that it has not acknowledged yet.

# %%
# %%writefile ch00_tasks.py
"""Chapter 0's tasks."""

import os
import time

from celery import Celery

BROKER = os.environ["CELERYLAB_BROKER_URL"]  # this notebook's own Redis (set by celerylab.start)

app = Celery("ch00_tasks", broker=BROKER, backend=BROKER)
app.conf.update(
    task_serializer="json",  # messages are JSON: readable, and safe to accept
    result_serializer="json",
    accept_content=["json"],  # refuse anything else (never pickle)
    result_expires=3600,  # result keys expire after one hour
    task_acks_late=False,  # the default: acknowledge when a pool child starts the task
    worker_prefetch_multiplier=4,  # the default; the worker command line repeats it
    broker_connection_retry_on_startup=True,
)


@app.task
def add(x, y):
    return x + y


@app.task
def send_receipt(order_id):
    """Stands for a slow call to an email API: 0.2 s spent waiting on the network."""
    time.sleep(0.2)
    return f"receipt for order {order_id} sent"


# %% [markdown]
# ## Start a worker
#
# In a terminal you would start a worker with the command printed first below.
# `stack.spawn_worker` runs that command as a process of its own, with a few additions printed
# second (a name, a log file, the course's recorder, and no waiting for other workers at boot),
# and returns once Celery's `worker_ready` signal fired. (To boot in a fraction of a second, the
# course forks each worker from a helper process that has imported Celery already; what runs is
# Celery's own `celery worker` with that command line, and `ps` shows it by name.) The
# **prefork** pool (the default) has a
# *main process* that talks to the broker and *child processes* that run tasks: `--concurrency 2`
# means two children.

# %%
worker = stack.spawn_worker("ch00_tasks", concurrency=2, pool="prefork", queues=["celery"])
print("you would type: ", " ".join(worker.typed_command))
print("the course adds:", " ".join(worker.course_flags))
print(f"ready in {worker.boot_seconds:.2f} s")
plots.table(stack.processes())

# %%
children = worker.children()
assert len(children) == 2, children

# %% [markdown]
# ## One task, end to end
#
# `add.delay(2, 3)` publishes a message and returns at once with an `AsyncResult`. The worker's
# main process receives the message, a child runs `add`, the outcome is written to the result
# backend, and `result.get()` reads it from there. The course records each step from Celery's own
# signals (`before_task_publish`, `task_received`, `task_prerun`, `task_postrun`), with the pid that
# did it.

# %%
import ch00_tasks

result = ch00_tasks.add.delay(2, 3)
print("task id:", result.id, "-> result:", result.get(timeout=10))
(attempt,) = stack.wait_for([result.id])
plots.table([attempt])

# %%
assert result.get() == 5
assert attempt.sent <= attempt.received <= attempt.started <= attempt.finished
assert attempt.pid in worker.children(), "a pool child ran it, not the main process"

# %% [markdown]
# The result backend holds the outcome under a key named after the task id, as JSON:

# %%
raw = stack.redis.get(f"celery-task-meta-{result.id}")
print(raw.decode())
assert b'"SUCCESS"' in raw

# %% [markdown]
# ## Why background work: the request handler's point of view
#
# Two versions of the same web handler. One sends the receipt *inline*: calling a task object
# directly runs its code right here, in the handler. The other *enqueues* it and returns. The work
# is the same 0.2 s; what changes is who waits for it.

# %%
def handle_inline(order_id):
    return ch00_tasks.send_receipt(order_id)  # runs the task's code here, in the handler


def handle_enqueue(order_id):
    return ch00_tasks.send_receipt.delay(order_id).id  # publishes a message; a worker runs it


def time_requests(handler, n):
    latencies, outputs = [], []
    for order_id in range(n):
        t0 = time.perf_counter()
        outputs.append(handler(order_id))
        latencies.append(time.perf_counter() - t0)
    return latencies, outputs


inline_latency, _ = time_requests(handle_inline, 10)
enqueue_latency, task_ids = time_requests(handle_enqueue, 10)
background = stack.wait_for(task_ids, timeout=30)
print(f"handler median: inline {statistics.median(inline_latency) * 1000:.1f} ms, "
      f"enqueue {statistics.median(enqueue_latency) * 1000:.2f} ms")
plots.latency_distributions({"inline": inline_latency, "enqueue": enqueue_latency},
                            "Handler latency per request", log=True);

# %% [markdown]
# The enqueueing handler answers in a few milliseconds (the median is printed above: publishing
# one message to a local Redis), whatever the work costs: at least ten times faster than the
# inline one, as the assertions below check. The work did not disappear: the worker's two
# children did it, in parallel, after the handlers had answered.

# %%
plots.timeline(background, title="The receipts, done in the background");

# %%
assert statistics.median(enqueue_latency) * 10 < statistics.median(inline_latency)
assert all(a.state == "SUCCESS" for a in background)
assert {a.pid for a in background} == set(worker.children()), "both children shared the work"
assert processes_at_once(background) == 2, "in parallel: both children were busy at one moment"

# %% [markdown]
# **Try it.** Pick a handler and press the button: each press times a few more requests (the
# logic is `celerylab.widgets.time_handler`; here it runs once without the button too).

# %%
once = widgets.time_handler(handle_enqueue, 3)
assert once["requests"] == 3 and once["median ms"] < statistics.median(inline_latency) * 1000
widgets.handler_timer({"enqueue": handle_enqueue, "inline": handle_inline}, stack.redis)

# %% [markdown]
# That is the trade this course is about. The handler became fast and its failure modes changed:
# the receipt now depends on a broker, a worker and a queue. The next chapters make each of those
# explicit, measured and tested.
#
# ## When something is not running
#
# `stack.health()` is the cell to run when anything looks wrong. Stop the worker and ask again:
# it says what is missing and how to start it. `./course doctor` checks the whole machine.

# %%
worker.stop()
assert stack.health(), "the broker still answers; only the worker is gone"
assert stack.control.control.ping(destination=[worker.hostname], timeout=0.5) == [], \
    "no worker answers a ping any more"

# %% [markdown]
# ## Clean up
#
# `stack.stop()` stops every worker and the notebook's Redis. (Closing the notebook, or even a
# crashed kernel, does the same: a watchdog process stops whatever the kernel started.)
#
# **Next:** [Chapter 1 — Brokers and messages](ch01_brokers_and_messages.ipynb).

# %%
stack.stop()
