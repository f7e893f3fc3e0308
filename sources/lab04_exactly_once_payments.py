# %% [markdown]
# # Lab 4 — Exactly-once payments
#
# `apply_payment` credits a payment to an account, between two slow calls to the bank. Today it
# can lose a payment when a process crashes, and credit one twice when a message is delivered
# twice. Make it **crash-safe** (a crash never loses a payment) and **idempotent** (a payment is
# credited once, however many times its message arrives, and whenever it arrives).
#
# The checker starts a worker on your module (4 pool processes) and then does, on purpose, what
# production does to payments sooner or later:
#
# 1. it **SIGKILLs the whole worker** while one payment is already credited and another is still
#    being authorised, rewrites the fetch times kombu stored for that worker's unacknowledged
#    messages (as if the visibility timeout, an hour, had passed), and restarts it;
# 2. it **SIGKILLs the pool process running a payment**, mid-authorisation, and leaves the worker
#    running. This is what the kernel's OOM killer does to a process that grows too big, and it
#    is the common crash: the worker main process survives, notices that its child died, and
#    decides what becomes of the message. Chapter 4's "Five crashes" table showed that the
#    acknowledgement mode alone does not decide it;
# 3. it **SIGKILLs the process between two writes your payment makes to Redis**, like the OOM
#    killer could, and it does it at every place there is: it counts the writes one payment of
#    yours makes, then runs that many other payments, each killed right after a different write
#    (the first, the second, ...; up to the sixth, counted over a whole run); and when such a
#    payment comes back, it kills the redelivered runs too, one after another, right after their
#    own first write, then their second: a duplicate's writes (an undo, say) must not be split
#    either. It does it through `db`, the Redis client the
#    module gets from the course (it is a `redis.Redis` in every other respect), so write through
#    `db`. A Lua script is one command, and a MULTI/EXEC transaction runs all its queued
#    commands or, if the process dies before EXEC, none, so neither is split (it is no rollback,
#    though: a command that fails while EXEC runs does not undo the others). A plain pipeline
#    (`transaction=False`) is no unit: Redis runs its commands one by one, and so does the checker;
# 4. it delivers **one payment twice at the same moment** to two processes, and runs the two
#    copies **in lockstep**: each Redis command one copy sends through `db` waits until the other
#    copy has reached the same command, so any gap between a check and a write shows;
# 5. it **sends a payment again** after it was applied (a client retrying its request: a
#    duplicate), and sends **two different payments of the same amount to one account** (two
#    payment ids: not duplicates);
#
# and counts every cent in the `balances` hash.
#
# How long must a payment be remembered? At least as long as a redelivery can take: a message
# comes back after the broker's visibility timeout, an hour by default (and in this lab), and a
# client may re-send a payment later still. The checker can only look at the TTLs of your keys
# (it fails a memory that expires within the hour); it cannot see an expiry built into the data
# itself, such as a "recent payments" set trimmed to the last minute, or a list capped at 100
# entries. Those forget a payment just as surely in production, so don't rely on the checker
# there: keep the memory for at least the visibility timeout.
#
# Hints from Chapter 4: which acknowledgement mode survives a crash, and what does Celery do with
# the message of a task whose process died? How does a task recognise a payment it already
# applied, for how long must it remember, and why must that check and the credit happen in one
# step?
#
# > **How to run this lab.** "Run All" stops at the first place you are meant to write (a cell
# > that raises `NotImplementedError`): that is expected. Write your answer there and run that
# > cell, then run the cells below it one by one; the **check** cell runs on its own and says
# > what passed, or gives a hint. Solved version: `solutions/` in the course folder.

# %%
import celerylab
from celerylab.checks import check_lab04, hint_button

stack = celerylab.start("lab04")

# %% [markdown]
# ## The task module
#
# Fill in the two marked places, then run the cell (it writes `lab04_tasks.py`) and the check.

# %%
# %%writefile lab04_tasks.py
"""Lab 4: payments."""

import os
import time

from celery import Celery

from celerylab import chaos

BROKER = os.environ["CELERYLAB_BROKER_URL"]

app = Celery("lab04_tasks", broker=BROKER, backend=BROKER)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    # The visibility timeout keeps its default, an hour. After it kills a whole worker, the
    # checker fast-forwards that hour for the dead worker's messages; kombu, inside the restarted
    # worker, puts them back in the sweep it runs at start, and with these options sweeps again
    # every second (instead of about every 100 s).
    broker_transport_options={"unacked_restore_interval": 1, "unacked_restore_throttle": 1},
)
# A redis.Redis client; the checker may SIGKILL this process right after any write you make
# through it, or hold a command until a duplicate delivery reaches the same point.
db = chaos.connect(BROKER, unwatched_keys=["bank:calls"])


def bank(step, payment_id, seconds):
    """The bank's slow API (given; the checker watches these calls)."""
    db.rpush("bank:calls", f"{step}:{payment_id}")
    time.sleep(seconds)


# 1. Settings and helpers your task needs.
### BEGIN SOLUTION
# Acknowledge when the task returns: if the whole worker dies first, the message stays in
# `unacked` and comes back after the visibility timeout.
app.conf.task_acks_late = True
# A pool child killed mid-task (OOM killer): put its message back instead of storing FAILURE.
# (A task that kills its process every time would loop: fine here, a payment does not.)
app.conf.task_reject_on_worker_lost = True

# The idempotency key and the credit in one atomic step: a crash cannot separate them.
CREDIT_ONCE = db.register_script("""
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
    return redis.call('HINCRBY', KEYS[2], ARGV[3], ARGV[1])
end
return false
""")
### END SOLUTION


@app.task
def apply_payment(payment_id, account, amount_cents):
    bank("authorize", payment_id, 1.0)
    # 2. Credit amount_cents to account (HINCRBY balances <account> <amount_cents>),
    #    exactly once per payment_id.
    ### BEGIN SOLUTION
    # keys live a week: longer than any redelivery, retry or replay can take
    CREDIT_ONCE(keys=[f"payment:{payment_id}", "balances"],
                args=[amount_cents, 7 * 24 * 3600, account])
    ### END SOLUTION
    bank("notify", payment_id, 1.0)


# %% [markdown]
# ## Stuck?
#
# Each press gives a hint, each more specific than the last (three in all); none is
# the answer. (`hint("lab04")` from `celerylab.checks` does the same in a cell.)

# %%
hint_button("lab04")

# %% [markdown]
# ## Check

# %%
check_lab04(stack)

# %%
stack.stop()
