# %% [markdown]
# # Lab 3 — Keep the fast path fast
#
# Three kinds of work share one broker (task code in `celerylab/workloads.py`):
#
# | task | kind | in the checker's workload |
# |---|---|---|
# | `celerylab.workloads.lookup` | latency-sensitive: a user waits | 30, one every 30 ms |
# | `celerylab.workloads.render_report` | slow: 1 s each | 6, sent first |
# | `celerylab.workloads.import_catalog` | memory-hungry: keeps 150 MiB in its process | 2, sent first |
#
# **Your task:** write the routes (the producer's `task_routes`) and the worker layout so that the
# lookups stay fast while the reports and imports run: their **p95 latency (sent to finished) at
# most 25% of the baseline's**, the imports never run next to the lookups, and no process keeps an
# import's memory afterwards. The baseline is measured by the checker in the same run, on this
# machine: the same workload with every task in one queue, served by one worker with the whole
# budget (`-c 6`). A ratio, not a number of seconds: a busy laptop slows both alike.
# Budget: **6 children or threads in all**, across at most 3 workers.
#
# A worker is a dict: `queues` (list), `concurrency`, optional `pool` (default `prefork`), `name`,
# `max_memory_per_child` (KiB, or `None`) and `max_tasks_per_child` (or `None`), each passed to
# `celery worker` as its flag; any other key is refused. Chapter 3 has everything you need.
#
# > **How to run this lab.** "Run All" stops at the first place you are meant to write (a cell
# > that raises `NotImplementedError`): that is expected. Write your answer there and run that
# > cell, then run the cells below it one by one; the **check** cell runs on its own and says
# > what passed, or gives a hint. Solved version: `solutions/` in the course folder.

# %%
import celerylab
from celerylab.checks import check_lab03, hint_button

stack = celerylab.start("lab03")

# %% [markdown]
# ## Your plan

# %%
def routing_plan():
    """{"routes": <task_routes>, "workers": [<worker>, ...]}"""
    ### BEGIN SOLUTION
    return {
        "routes": {
            "celerylab.workloads.lookup": {"queue": "fast"},
            "celerylab.workloads.render_report": {"queue": "slow"},
            "celerylab.workloads.import_catalog": {"queue": "bulky"},
        },
        "workers": [
            {"name": "fast", "queues": ["fast"], "concurrency": 1},  # nothing else to wait behind
            {"name": "slow", "queues": ["slow"], "concurrency": 4},  # throughput for slow work
            {"name": "bulky", "queues": ["bulky"], "concurrency": 1,  # one import at a time,
             "max_memory_per_child": 120 * 1024},  # and a fresh child after each
        ],
    }
    ### END SOLUTION


# %% [markdown]
# ## Look before you run
#
# Where would each task go under your routes? (The producer applies `task_routes` when it sends.)

# %%
from celery import Celery

preview = Celery("preview", broker=stack.url, set_as_current=False)
preview.conf.task_routes = routing_plan()["routes"]
for name in ("celerylab.workloads.lookup", "celerylab.workloads.render_report",
             "celerylab.workloads.import_catalog"):
    print(f"{name:38} -> {preview.amqp.router.route({}, name, (), {})['queue'].name}")

# %% [markdown]
# ## Stuck?
#
# Each press gives a hint, each more specific than the last (three in all); none is
# the answer. (`hint("lab03")` from `celerylab.checks` does the same in a cell.)

# %%
hint_button("lab03")

# %% [markdown]
# ## Check
#
# The checker starts your workers, sends the workload through your routes, and measures.

# %%
check_lab03(routing_plan, stack)

# %%
stack.stop()
