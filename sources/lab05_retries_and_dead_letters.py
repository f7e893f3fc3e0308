# %% [markdown]
# # Lab 5 — Retries and dead letters for a flaky dependency
#
# `sync_order(order_id, store, express=False)` calls a dependency that fails in three ways:
#
# * `DependencyDown`: it is unavailable for a while (worth retrying, later);
# * `InvalidOrder`: the order itself is malformed (retrying cannot help);
# * for some orders, the process running the task is killed outright (as the out-of-memory
#   killer would), after the dependency failed a few times.
#
# **Your task:**
# 1. a retry **policy** for `sync_order` (options for `@app.task`): retry only what can recover,
#    with exponential backoff, jitter, a cap on the delay and a bounded number of retries. This
#    lab's numbers: the delay is capped at **4 s or less**, the cap is **above the first step**
#    (so at least one doubling shows), and a task gives up after **2 to 5 retries**;
# 2. **dead-letter handling**: when `sync_order` fails for good, *however it fails* (the killed
#    process too), push a JSON dict with `task`, `id`, `args`, `kwargs`, `error` (naming the
#    exception's class, e.g. `"InvalidOrder: ..."`) and `attempts` onto the Redis list
#    `lab05:dead` (nothing for a failure that is still going to be retried);
# 3. `replay_dead_letters(r, send_task)`: after the cause is fixed, re-send every dead letter with
#    its original task name, args and kwargs, **oldest first** (in the order they died), each
#    once, leave the list empty, and return a list with the result of each message it sent.
#
# **What the check does.** It injects faults per order: a dozen or more orders fail as often as
# your policy retries and then recover, one never recovers, one dies with its process on its
# last attempt, two are malformed. It measures, from
# the recording, how long each retry waited (publish to start) and compares that with the bounds
# your declared policy implies (Celery's delay is `min(cap, factor * 2**n)` whole seconds, and
# jitter draws a whole number in `[0, delay]`): the waits must grow from retry to retry, and
# orders that failed together must not all wait the same time. Then it reads the dead-letter
# list, fixes the dependency, calls your replay, checks the messages it published, and watches
# what runs after it. Chapter 5 has the pieces.
#
# > **How to run this lab.** "Run All" stops at the first place you are meant to write (a cell
# > that raises `NotImplementedError`): that is expected. Write your answer there and run that
# > cell, then run the cells below it one by one; the **check** cell runs on its own and says
# > what passed, or gives a hint. Solved version: `solutions/` in the course folder.

# %%
import json

import celerylab
from celerylab.checks import check_lab05, hint_button

stack = celerylab.start("lab05")

# %% [markdown]
# ## The task module

# %%
# %%writefile lab05_tasks.py
"""Lab 5: a task calling a flaky dependency."""

import json
import os
import signal

import redis
from celery import Celery, signals

BROKER = os.environ["CELERYLAB_BROKER_URL"]

app = Celery("lab05_tasks", broker=BROKER, backend=BROKER)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)
db = redis.Redis.from_url(BROKER)


class DependencyDown(Exception):
    """The dependency did not answer: worth trying again later."""


class InvalidOrder(Exception):
    """The order itself is wrong: retrying cannot help."""


def call_dependency(order_id):
    """Given. The checker decides, per order id, how it fails."""
    fault = db.hget("lab05:faults", order_id)
    if fault == b"invalid":
        raise InvalidOrder(f"order {order_id} is malformed")
    if fault in (b"down", b"crash") and db.hincrby("lab05:failures-left", order_id, -1) >= 0:
        raise DependencyDown(f"dependency unavailable for {order_id}")
    if fault == b"crash":
        os.kill(os.getpid(), signal.SIGKILL)  # the process running the task dies
    return f"synced {order_id}"


DEAD_LETTERS = "lab05:dead"  # a Redis list of JSON dicts: task, id, args, kwargs, error, attempts

# Define POLICY (options for @app.task), BASE (the task's base class: app.Task unless you need
# your own) and whatever else your dead-letter handling needs.
### BEGIN SOLUTION
POLICY = {
    "autoretry_for": (DependencyDown,),  # only what a later attempt can fix
    "retry_backoff": True,  # 1, 2, 4 ... s
    "retry_backoff_max": 2,  # capped at 2 s (above the 1 s first step: one doubling)
    "retry_jitter": True,  # callers that failed together do not retry together
    "max_retries": 3,  # four attempts in all, then a dead letter
}


BASE = app.Task


@signals.task_failure.connect
def dead_letter(sender=None, task_id=None, exception=None, args=None, kwargs=None, **_):
    """Sent once a task has failed for good (not on each retry): by the pool child for an
    exception, by the worker's main process when the child died. (Task.on_failure would miss
    the second: it runs in the child.)"""
    if getattr(sender, "name", None) != "lab05_tasks.sync_order":
        return
    db.lpush(DEAD_LETTERS, json.dumps({
        "task": sender.name, "id": task_id, "args": list(args or ()), "kwargs": kwargs or {},
        "error": f"{type(exception).__name__}: {exception}",
        "attempts": sender.request.retries + 1}))
### END SOLUTION


@app.task(base=BASE, **POLICY)
def sync_order(order_id, store, express=False):
    """Sync one order of one store with the dependency."""
    return call_dependency(order_id)


# %% [markdown]
# ## Replay

# %%
def replay_dead_letters(r, send_task):
    """Re-send every dead letter, oldest first, with its original task name, args and kwargs;
    leave `lab05:dead` empty; return the list of results (what `send_task` returns)."""
    ### BEGIN SOLUTION
    results = []
    # only the letters there now: a replayed task that fails again is a new letter, for the
    # next replay (popping until the list is empty could chase it forever)
    for _ in range(r.llen("lab05:dead")):
        letter = json.loads(r.rpop("lab05:dead"))  # LPUSHed, so the oldest is on the right
        results.append(send_task(letter["task"], letter["args"], letter["kwargs"]))
    return results
    ### END SOLUTION


# %% [markdown]
# ## Stuck?
#
# Each press gives a hint, each more specific than the last (three in all); none is
# the answer. (`hint("lab05")` from `celerylab.checks` does the same in a cell.)

# %%
hint_button("lab05")

# %% [markdown]
# ## Check

# %%
check_lab05(replay_dead_letters, stack)

# %%
stack.stop()
