# %% [markdown]
# # Lab 2 — Pick the pool for the work
#
# A service has two kinds of background work, already on their own queues:
#
# * `cpu`: 8 tasks of pure-Python number crunching (~0.1 s of CPU each);
# * `io`: 60 tasks that each wait 0.5 s on a slow API.
#
# **Your task:** choose one or two workers (pool and concurrency, and which queues each consumes)
# so the whole batch finishes at **40 tasks/s or better** on this machine, measured from the first
# message sent to the last task finished. Pools: `prefork`, `threads`, `solo`; concurrency 1-32.
#
# Chapter 2 measured what each pool does with each kind of work. Measure your candidates with the
# cell below before you run the check.

# %%
import os

import celerylab
from celerylab.checks import check_lab02, run_lab02_workload

stack = celerylab.start("lab02")
print("cores on this machine:", os.cpu_count())

# %% [markdown]
# ## Your layout

# %%
def choose_layout():
    """One or two workers: [{"pool": ..., "concurrency": ..., "queues": [...]}, ...]."""
    ### BEGIN SOLUTION
    return [
        {"pool": "prefork", "concurrency": 2, "queues": ["cpu"]},  # CPU work: a process per core
        {"pool": "threads", "concurrency": 30, "queues": ["io"]},  # waiting: many cheap threads
    ]
    ### END SOLUTION


# %% [markdown]
# ## Measure a candidate
#
# `run_lab02_workload` starts the workers of a layout, runs the workload and reports the figures.
# Try a naive layout first, then yours.

# %%
naive = [{"pool": "prefork", "concurrency": 2, "queues": ["cpu", "io"]}]
for name, layout in (("naive", naive), ("yours", choose_layout())):
    figures = run_lab02_workload(stack, layout)
    print(f"{name:6} {figures['tasks/s']:5.1f} tasks/s  ({figures['finished']}/{figures['total']}"
          f" done; CPU tasks spanned {figures['cpu seconds']} s, I/O tasks {figures['io seconds']} s)")

# %% [markdown]
# ## Check

# %%
check_lab02(choose_layout, stack)

# %%
stack.stop()
