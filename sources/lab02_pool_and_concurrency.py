# %% [markdown]
# # Lab 2 — Pick the pool for the work
#
# A service has two kinds of background work, already on their own queues:
#
# * `cpu`: 8 tasks of pure-Python number crunching (together one or two seconds of CPU);
# * `io`: 60 tasks that each wait 0.5 s on a slow API.
#
# **Your task:** choose one or two workers (pool and concurrency, and which queues each consumes)
# so that **each kind of work runs as well as this machine allows**:
#
# * the CPU-bound tasks get more than one core: they run in separate processes, at least two at
#   the same moment, one task per process at a time;
# * all 60 I/O-bound tasks finish within **5 times the time one of them takes**.
#
# Pools: `prefork`, `threads`, `solo`; concurrency 1-32. The checker sends both kinds at once to
# your workers (prefetch multiplier 1). It also shows the speed-up your CPU-bound tasks got next to
# the same burns run by one and by two plain processes right before (a fair comparison on a busy
# laptop). The speed-up is shown, not judged: on a busy machine the kernel sometimes keeps two
# processes on one core for a while, and that is not your layout's doing.
#
# Chapter 2 measured what each pool does with each kind of work. Measure your candidates with the
# cell below before you run the check.
#
# > **How to run this lab.** "Run All" stops at the first place you are meant to write (a cell
# > that raises `NotImplementedError`): that is expected. Write your answer there and run that
# > cell, then run the cells below it one by one; the **check** cell runs on its own and says
# > what passed, or gives a hint. Solved version: `solutions/` in the course folder.

# %%
import celerylab
from celerylab.checks import check_lab02, hint_button
from celerylab.checks.lab02 import cpu_reference, run_lab02_workload

stack = celerylab.start("lab02")

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
# `run_lab02_workload` starts the workers of a layout, runs the workload and reports the figures;
# `cpu_reference` burns the same CPU work in one and in two plain processes, right now. Try a naive
# layout first, then yours. (The naive one is stopped once its I/O tasks have taken 12 times the
# time one takes.)

# %%
ref = cpu_reference()
print(f"reference: one process {ref['serial s']:.2f} s, two processes {ref['parallel s']:.2f} s "
      f"(parallelism {ref['parallelism']:.2f})")
naive = [{"pool": "prefork", "concurrency": 2, "queues": ["cpu", "io"]}]
for name, layout in (("naive", naive), ("yours", choose_layout())):
    fig = run_lab02_workload(stack, layout)
    cpu = "unfinished" if fig["cpu seconds"] is None else f"{fig['cpu seconds']:.2f} s"
    io = "unfinished" if fig["io waves"] is None else f"{fig['io waves']:.1f} x one task"
    print(f"{name:6} CPU-bound tasks {cpu:>10}   I/O-bound tasks {io:>14}   "
          f"({fig['finished']}/{fig['total']} done, {fig['tasks/s']:.1f} tasks/s)")

# %% [markdown]
# ## Stuck?
#
# Each press gives a hint, each more specific than the last (three in all); none is
# the answer. (`hint("lab02")` from `celerylab.checks` does the same in a cell.)

# %%
hint_button("lab02")

# %% [markdown]
# ## Check

# %%
check_lab02(choose_layout, stack)

# %%
stack.stop()
