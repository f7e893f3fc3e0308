# %% [markdown]
# # Lab 4 — Exactly-once payments
#
# `apply_payment` credits a payment to an account, between two slow calls to the bank. Today it
# can lose a payment when a worker crashes, and credit one twice when a message is delivered
# twice. Make it **crash-safe** (a crash never loses a payment) and **idempotent** (a payment is
# credited once, however many times its message arrives).
#
# The checker starts a worker on your module, sends payments, **SIGKILLs the worker** while one
# payment is already credited and another is still being authorised, restarts it, sends one
# payment twice (a client retrying), and counts every cent in the `balances` hash.
#
# Hints from Chapter 4: which acknowledgement mode survives a crash? What does it cost? How does
# a task recognise a payment it already applied, and why must that check and the credit happen
# in one step?

# %%
import celerylab
from celerylab.checks import check_lab04

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

import redis
from celery import Celery

BROKER = os.environ["CELERYLAB_BROKER_URL"]

app = Celery("lab04_tasks", broker=BROKER, backend=BROKER)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "visibility_timeout": 3,  # short, so the checker does not wait an hour
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
)
db = redis.Redis.from_url(BROKER)


def bank(step, payment_id, seconds):
    """The bank's slow API (given; the checker watches these calls)."""
    db.rpush("bank:calls", f"{step}:{payment_id}")
    time.sleep(seconds)


# 1. Settings and helpers your task needs.
### BEGIN SOLUTION
app.conf.task_acks_late = True  # acknowledge when the task returns: a crash brings it back

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
# ## Check

# %%
check_lab04(stack)

# %%
stack.stop()
