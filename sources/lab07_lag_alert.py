# %% [markdown]
# # Lab 7 — An alert on queue lag
#
# On-call engineers mute alerts that page for nothing, and then miss the one that mattered.
# You will write the two halves of a queue-lag alert that pages for a stalled queue and not for
# a burst:
#
# 1. `sample_queue(r, queue)`: one **read-only** reading of a queue, the dict
#    `{"depth": <messages waiting, int>, "oldest_age": <seconds the oldest waiting message has
#    waited, or None when none waits>}`;
# 2. `lag_alert(history)`: given one queue's readings so far (oldest first, each
#    `{"t": <time.time() of the reading>, "depth": ..., "oldest_age": ...}`), return `True`
#    while the alert should fire, `False` otherwise.
#
# What you need from chapters 1, 3 and 7:
# * a queue is a Redis list named after it, **plus** its priority sub-lists `queue + "\x06\x16"
#   + step` for the steps 3, 6 and 9 (chapter 3); workers pop from the right end;
# * Celery's message has no publish time; every message the course publishes carries one, in
#   seconds since the epoch, in its `headers` under `celerylab_sent_at` (the envelope is JSON);
# * a monitor runs all day beside the workers: it must only read Redis.
#
# **What the check does.** First it reads two queues of known contents with your sampler (in
# one the oldest message waits in a priority sub-list, in the other in the bare list behind a
# long backlog, next to a queue whose name starts the same), through a client that may only read.
# Then, live, three queues take a steady load of 50 ms tasks, and your sampler and alert run
# every 0.25 s on each; your readings are compared with the queues' own, and each reading should
# take milliseconds:
#
# | queue | what happens | your alert must |
# |---|---|---|
# | `lab07-steady` | its worker keeps up | stay quiet |
# | `lab07-burst` | 80 extra messages at once; its worker drains them (the oldest waits about 1 s, at most 2 s) | stay quiet |
# | `lab07-stall` | its worker is frozen at 1 s; a second worker is added at 8 s | fire within 6 s of the freeze, and clear within 2 s once the queue has drained |
#
# > **How to run this lab.** "Run All" stops at the first place you are meant to write (a cell
# > that raises `NotImplementedError`): that is expected. Write your answer there and run that
# > cell, then run the cells below it one by one; the **check** cell runs on its own and says
# > what passed, or gives a hint. Solved version: `solutions/` in the course folder.

# %%
import json
import time

import celerylab
from celerylab.checks import check_lab07, hint_button

stack = celerylab.start("lab07")
r = stack.redis

# %% [markdown]
# ## Your sampler

# %%
def sample_queue(r, queue):
    """{"depth": int, "oldest_age": float | None}: one read-only reading of `queue`."""
    ### BEGIN SOLUTION
    lists = [queue] + [f"{queue}\x06\x16{step}" for step in (3, 6, 9)]
    depth, stamps = 0, []
    for name in lists:
        depth += r.llen(name)
        oldest = r.lindex(name, -1)  # workers pop from the right: the oldest is there
        if oldest is not None:
            stamps.append(float(json.loads(oldest)["headers"]["celerylab_sent_at"]))
    return {"depth": depth, "oldest_age": time.time() - min(stamps) if stamps else None}
    ### END SOLUTION


# %% [markdown]
# Try it on a queue nobody consumes: two messages now, one with a priority a moment later.

# %%
send = stack.control.send_task
send("celerylab.workloads.wait_io", (0,), queue="lab07-try")
send("celerylab.workloads.wait_io", (0,), queue="lab07-try")
time.sleep(0.5)
send("celerylab.workloads.wait_io", (0,), queue="lab07-try", priority=6)
print(sample_queue(r, "lab07-try"))

# %% [markdown]
# ## Your alert

# %%
def lag_alert(history):
    """True while the alert should fire, given one queue's readings so far (oldest first)."""
    ### BEGIN SOLUTION
    # the oldest message older than 3 s, in every reading of the last second (Prometheus' `for`)
    above, hold = 3.0, 1.0
    since = None
    for reading in history:
        age = reading["oldest_age"]
        if age is not None and age > above:
            since = reading["t"] if since is None else since
        else:
            since = None
    return since is not None and history[-1]["t"] - since >= hold
    ### END SOLUTION


# %% [markdown]
# Try it on two made-up histories, one reading every 0.25 s: a queue that drains, a queue stuck.

# %%
now = time.time()
draining = [{"t": now + i / 4, "depth": 40 - 4 * i, "oldest_age": 0.1 * i} for i in range(10)]
stuck = [{"t": now + i / 4, "depth": 3 + i, "oldest_age": 1.0 + i / 4} for i in range(24)]
print("draining:", lag_alert(draining), " stuck:", lag_alert(stuck))

# %% [markdown]
# ## Stuck?
#
# Each press gives a hint, each more specific than the last (three in all); none is
# the answer. (`hint("lab07")` from `celerylab.checks` does the same in a cell.)

# %%
hint_button("lab07")

# %% [markdown]
# ## Check
#
# About 20 s: real workers, a real freeze.

# %%
check_lab07(sample_queue, lag_alert, stack)

# %%
stack.stop()
