# %% [markdown]
# # Lab 1 — What is waiting in a queue?
#
# When a queue backs up, the first question is *what* is waiting: which tasks, with which
# arguments, how many retries, scheduled for when. Celery's `inspect()` only sees what workers
# hold; the messages still in the broker are invisible to it. You will write the tool that sees
# them.
#
# **Your task:** write `pending_messages(r, queue)` that returns the messages waiting in `queue`
# as a list of dicts with the keys `task`, `id`, `args`, `kwargs`, `retries` and `eta`,
# **oldest first** (the next one a worker would take first), **without consuming anything**.
#
# Hints, from Chapter 1:
# * a queue is a Redis list named after it; which commands *read* a list without popping?
# * each item is a JSON envelope: `headers`, `properties`, and a `body` encoded as
#   `properties["body_encoding"]` says;
# * producers push on one end and workers pop from the other.

# %%
import base64
import json

import celerylab
from celerylab.checks import check_lab01

stack = celerylab.start("lab01")
r = stack.redis

# %% [markdown]
# ## Your function

# %%
def pending_messages(r, queue):
    """The messages waiting in `queue`, oldest first, as dicts; the queue is left untouched."""
    ### BEGIN SOLUTION
    messages = []
    for raw in reversed(r.lrange(queue, 0, -1)):  # LPUSH adds at the left; workers BRPOP the right
        envelope = json.loads(raw)
        headers = envelope["headers"]
        body = envelope["body"]
        if envelope["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _embed = json.loads(body)
        messages.append({"task": headers["task"], "id": headers["id"], "args": args,
                         "kwargs": kwargs, "retries": headers.get("retries", 0),
                         "eta": headers.get("eta")})
    return messages
    ### END SOLUTION


# %% [markdown]
# ## Try it
#
# Three messages on a queue no worker consumes (`send_task` publishes by name: no task code is
# needed to send one). Look at what your function returns.

# %%
r.delete("lab01-try")
for amount in (10, 20):
    stack.control.send_task("shop.charge", args=[amount, "EUR"], queue="lab01-try")
stack.control.send_task("shop.send_receipt", args=["ada@example.com"], queue="lab01-try",
                        countdown=60)
for message in pending_messages(r, "lab01-try"):
    print(message)

# %% [markdown]
# ## Check
#
# The checker publishes messages of its own (with kwargs, retries and an ETA among them), calls
# your function and compares. It prints what passed, or a hint.

# %%
check_lab01(pending_messages, stack)

# %%
stack.stop()
