# %% [markdown]
# # Lab 6 — Short tasks stuck behind long ones
#
# Two workers share one queue. Most tasks take 50 ms, a few take 2 s, and the short ones are
# the ones a user waits for. With Celery's defaults, a short task sometimes takes as long as a
# long one, while the other worker has nothing to do. (Task code: `celerylab/workloads.py`.)
#
# | task | acknowledged | in the checker's workload |
# |---|---|---|
# | `celerylab.workloads.hold` | early (when a child starts it: the default) | 3 long (2 s), sent first, then 10 short (0.05 s) |
# | `celerylab.workloads.hold_late` | late (`acks_late=True`: after it returns) | the same workload, when your settings say `acks_late` |
#
# **Your task:** choose the workers' settings so that the short tasks' **p95 latency (sent to
# finished) is at most 50% of the default's**, and the **makespan (first sent to last finished)
# at most 115% of the default's**: short tasks must stop waiting, without making the batch
# slower. The default is measured by the checker in the same run, side by side with yours: two
# workers with `--prefetch-multiplier 4`, early ack, `-c 2`. Ratios, not seconds: a busy laptop
# slows both alike. Budget: **at most 2 children per worker** (what the reference runs with;
# Celery's own default concurrency is the number of CPUs), two workers.
#
# Your settings are a dict: `prefetch_multiplier` (a whole number, at least 1), `acks_late`
# (`True` or `False`: which of the two tasks the checker sends), `concurrency` (children per
# worker), and optionally `disable_prefetch` (`True` adds `--disable-prefetch`). Chapter 6 has
# everything you need.
#
# > **How to run this lab.** "Run All" stops at the first place you are meant to write (a cell
# > that raises `NotImplementedError`): that is expected. Write your answer there and run that
# > cell, then run the cells below it one by one; the **check** cell runs on its own and says
# > what passed, or gives a hint. Solved version: `solutions/` in the course folder.

# %%
import celerylab
from celerylab import prefetch
from celerylab.checks import check_lab06, hint_button

stack = celerylab.start("lab06")

# %% [markdown]
# ## Your settings

# %%
def worker_settings():
    """{"prefetch_multiplier": int, "acks_late": bool, "concurrency": int,
    "disable_prefetch": bool (optional)}"""
    ### BEGIN SOLUTION
    return {
        "prefetch_multiplier": 1,  # hold no more than the children can run...
        "acks_late": True,  # ...counting the running tasks: nothing waits inside a busy worker
        "concurrency": 2,  # the whole budget
    }
    ### END SOLUTION


# %% [markdown]
# ## Look before you run
#
# The command line each of the two workers will run with your settings, and the task the checker
# will send them:

# %%
settings = worker_settings()
for w in prefetch.workers_for(stack, "celerylab.workloads", settings, queue="lab06",
                              names=["lab06a", "lab06b"]):
    print(" ".join(w.typed_command))
print("tasks sent:", "celerylab.workloads.hold_late" if settings.get("acks_late")
      else "celerylab.workloads.hold")

# %% [markdown]
# ## Stuck?
#
# Each press gives a hint, each more specific than the last (three in all); none is
# the answer. (`hint("lab06")` from `celerylab.checks` does the same in a cell.)

# %%
hint_button("lab06")

# %% [markdown]
# ## Check
#
# The checker boots four workers (two with the default settings, two with yours), sends each pair
# the same workload at the same moment, and compares.

# %%
check_lab06(worker_settings, stack)

# %%
stack.stop()
