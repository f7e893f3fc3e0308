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
# **in the order a worker would take them** (the next one first), **without touching the queue**:
# your function may only *read* Redis. Taking messages off and putting them back is not reading:
# while they are off the queue a worker can take the wrong one next, and a crash loses them.
#
# Hints, from Chapter 1:
# * a queue is a Redis list named after it; which commands *read* a list without popping?
# * each item is a JSON envelope: `headers`, `properties`, and a `body` encoded as
#   `properties["body_encoding"]` says. The task's real arguments are in the body; the
#   `argsrepr` / `kwargsrepr` headers are only how the producer chose to *display* them (a
#   producer can set them to anything, for instance to hide a card number from logs);
# * producers push on one end and workers pop from the other.
#
# ### One queue, up to four lists: priorities
#
# Chapter 3 treats priorities properly; here is what you need now. Redis has no priority queues,
# so kombu emulates them with one list per *priority step*. The steps are `[0, 3, 6, 9]`
# (kombu/transport/redis.py, `PRIORITY_STEPS`), and **0 is the highest priority**:
#
# | messages sent with priority      | wait in the Redis list       |
# |----------------------------------|------------------------------|
# | none, 0, 1 or 2                  | `queue` (the bare list)      |
# | 3, 4 or 5                        | `queue + "\x06\x163"`        |
# | 6, 7 or 8                        | `queue + "\x06\x166"`        |
# | 9                                | `queue + "\x06\x169"`        |
#
# A priority rounds *down* to its step, and a message without a priority counts as 0. The name
# of a sub-list is the queue name, kombu's separator `"\x06\x16"` (two control characters) and
# the step. A worker asks Redis for the bare list first, then step 3, 6 and 9 (one `BRPOP` over
# the lists in that order, `_brpop_start` in kombu/transport/redis.py): it takes nothing from a
# later list while an earlier one holds a message. So a queue's waiting messages are the
# messages of all its lists.
#
# > **How to run this lab.** "Run All" stops at the first place you are meant to write (a cell
# > that raises `NotImplementedError`): that is expected. Write your answer there and run that
# > cell, then run the cells below it one by one; the **check** cell runs on its own and says
# > what passed, or gives a hint. Solved version: `solutions/` in the course folder.

# %%
import base64
import json

import celerylab
from celerylab.checks import check_lab01, hint_button

stack = celerylab.start("lab01")
r = stack.redis

# %% [markdown]
# ## Your function
#
# The two constants describe kombu's priority lists (see the table above): use them.

# %%
PRIORITY_STEPS = (0, 3, 6, 9)  # kombu's priority steps on Redis; step 0 is the bare list
SEP = "\x06\x16"  # a sub-list is named f"{queue}{SEP}{step}"


def pending_messages(r, queue):
    """The messages waiting in `queue`, next-taken first, as dicts; the queue is left untouched."""
    ### BEGIN SOLUTION
    messages = []
    for step in PRIORITY_STEPS:  # a worker empties the bare list first, then step 3, 6, 9
        key = queue if step == 0 else f"{queue}{SEP}{step}"
        for raw in reversed(r.lrange(key, 0, -1)):  # LPUSH adds at the left; BRPOP takes the right
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
# Five messages on a queue no worker consumes (`send_task` publishes by name: no task code is
# needed to send one). Two carry a priority; one hides its card number from logs. Look at the
# Redis lists, then at what your function returns.

# %%
for key in r.scan_iter(match="lab01-try*"):
    r.delete(key)
for amount in (10, 20):
    stack.control.send_task("shop.charge", args=[amount, "EUR"], queue="lab01-try")
stack.control.send_task("shop.send_receipt", args=["ada@example.com"], queue="lab01-try",
                        countdown=60, priority=6)
stack.control.send_task("shop.charge", args=[30, "EUR"], queue="lab01-try", priority=4)
stack.control.send_task("shop.pay", args=["4111 1111 1111 1111", 12.5], queue="lab01-try",
                        argsrepr="['****', 12.5]")
for key in sorted(r.scan_iter(match="lab01-try*")):
    print(key, r.llen(key))
for message in pending_messages(r, "lab01-try"):
    print(message)

# %% [markdown]
# ## Stuck?
#
# Each press gives a hint, each more specific than the last (three in all); none is
# the answer. (`hint("lab01")` from `celerylab.checks` does the same in a cell.)

# %%
hint_button("lab01")

# %% [markdown]
# ## Check
#
# The checker publishes messages of its own (with kwargs, retries, an ETA, several priorities and
# a hidden argument among them), calls your function and compares, watching every command your
# function sends to Redis. It prints what passed, or a hint.

# %%
check_lab01(pending_messages, stack)

# %%
stack.stop()
