# %% [markdown]
# # Chapter 6 — Prefetch and throughput
#
# Three reports that teams write, again and again, in Celery's issue tracker and on forums:
#
# * "We run eight workers for hour-long jobs, yet only two are busy; the others sit idle while
#   jobs are waiting." The busy workers had fetched the waiting jobs for later.
# * "A task that takes 100 ms took 40 seconds to finish." It sat in a worker's memory behind a
#   long task, while another worker had nothing to do.
# * "`inspect().scheduled()` lists thousands of messages on one worker, but our prefetch is only
#   16." Those were ETA and countdown tasks: each one raises what a worker may hold.
#
# All three are **prefetch**: how many messages a worker takes from the broker before it can run
# them. This chapter counts what each setting holds, measures what it costs (makespan and
# short-task latency), where prefetch could help (many tiny tasks), and how to size concurrency.

# %%
import celerylab
from celerylab import observe, plots, prefetch, widgets
from celerylab.recording import percentile

stack = celerylab.start("ch06")
r = stack.redis
assert stack.health()

# %% [markdown]
# ## The settings, written out
#
# * `worker_prefetch_multiplier` (default 4, flag `--prefetch-multiplier`): a worker may hold
#   **concurrency × multiplier** unacknowledged messages (its *prefetch count*).
# * `task_acks_late` (default off): *when* a message is acknowledged. Early ack acknowledges when
#   a child starts the task, so a running task no longer counts against the prefetch count;
#   `acks_late` acknowledges after it returns, so running tasks do count.
# * `worker_disable_prefetch` (new in Celery 5.6, Redis only, flag `--disable-prefetch`): fetch
#   nothing while the worker already has as many tasks as pool processes.
# * `worker_eta_task_limit` (new in 5.6, default none): a ceiling on the *increases* ETA tasks make
#   to the worker's prefetch count (it becomes the QoS `max_prefetch`,
#   `celery/worker/consumer/tasks.py`; kombu's `QoS.increment_eventually` stops there, while
#   `decrement_eventually` does not look at it: `kombu/common.py`). Shown below, with its cost.
#
# `acks_late` is set per task below (`work` vs `work_late`), so one module serves every experiment;
# the flags go on each worker's command line (`Worker.command` shows it).

# %%
# %%writefile ch06_tasks.py
"""Chapter 6's tasks: long and short work, tiny tasks, with early and late acknowledgement."""

import os
import time

from celery import Celery

BROKER = os.environ["CELERYLAB_BROKER_URL"]

app = Celery("ch06_tasks", broker=BROKER, backend=BROKER)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=False,  # the default: acknowledged when a child starts the task
    worker_prefetch_multiplier=4,  # the default; each worker below passes its own flag
    worker_disable_prefetch=False,  # the default; --disable-prefetch turns it on per worker
    worker_eta_task_limit=None,  # the default: ETA tasks may raise the prefetch count freely
    task_ignore_result=False,  # the default: every result is stored (tiny_quiet opts out)
    worker_pool="prefork",
    broker_connection_retry_on_startup=True,
)


@app.task
def work(seconds):
    """Long or short work (it waits, as on a network call)."""
    time.sleep(seconds)


@app.task(acks_late=True)
def work_late(seconds):
    """The same, acknowledged after it returns."""
    time.sleep(seconds)


@app.task
def tiny():
    return 1


@app.task(acks_late=True)
def tiny_late():
    return 1


@app.task(ignore_result=True)
def tiny_quiet():
    """No result stored: one Redis write (and a publish) fewer per task."""
    return 1


# %% [markdown]
# A second module for the ETA cap: the same app and tasks, one setting changed. A worker started
# with `-A ch06_capped_tasks` runs it.

# %%
# %%writefile ch06_capped_tasks.py
"""Chapter 6's tasks, with the prefetch count capped at 10 however many ETA tasks arrive."""

from ch06_tasks import app

app.conf.worker_eta_task_limit = 10

# %% [markdown]
# ## What a busy worker holds
#
# Five workers, each `-c 2` on a queue of its own, each sent sixteen 1.5 s tasks; while the first
# two run, we ask each worker what it holds (`inspect().stats()`, `active()`, `reserved()`,
# `scheduled()`) and look in Redis: `HLEN unacked` is every message fetched and not yet
# acknowledged, `LLEN` what is still in the queue. Two more workers, for ETA tasks, boot at the
# same time (they are used further down).

# %%
import ch06_tasks

HOLD = {  # label: (setting, task)
    "multiplier 4, early ack (default)": ({"prefetch_multiplier": 4}, ch06_tasks.work),
    "multiplier 4, acks_late": ({"prefetch_multiplier": 4}, ch06_tasks.work_late),
    "multiplier 1, early ack": ({"prefetch_multiplier": 1}, ch06_tasks.work),
    "multiplier 1, acks_late": ({"prefetch_multiplier": 1}, ch06_tasks.work_late),
    "--disable-prefetch, early ack": ({"disable_prefetch": True}, ch06_tasks.work),
}
holders = [prefetch.workers_for(stack, "ch06_tasks", setting, queue=f"hold-{i}",
                                names=[f"hold{i}"])[0] for i, (setting, _) in enumerate(HOLD.values())]
eta_free = stack.worker("ch06_tasks", name="eta", queues=["eta"], concurrency=2)
eta_capped = stack.worker("ch06_capped_tasks", name="capped", queues=["capped"], concurrency=2)
stack.start_workers(*holders, eta_free, eta_capped)
print(" ".join(holders[-1].typed_command))

# %%
firsts = []
for i, (_, task) in enumerate(HOLD.values()):
    ids = [task.apply_async((1.5,), queue=f"hold-{i}").id for _ in range(16)]
    firsts += ids[:2]
for task_id in firsts:  # every worker has started its first two tasks...
    stack.started(task_id)
prefetch.wait_steady(stack, lambda: [r.llen(f"hold-{i}") for i in range(len(HOLD))],
                     what="the queues")  # ...and has stopped fetching
held = prefetch.held_now(stack, holders, [f"hold-{i}" for i in range(len(HOLD))])
for row, label in zip(held, HOLD, strict=True):
    row["worker"] = label
plots.table(held)

# %%
expected = {  # (prefetch_count, active, reserved, HLEN unacked), -c 2
    "multiplier 4, early ack (default)": (8, 2, 8, 8),  # running tasks are acked: 8 MORE wait
    "multiplier 4, acks_late": (8, 2, 6, 8),  # running tasks count: 8 in all
    "multiplier 1, early ack": (2, 2, 2, 2),  # still 2 waiting behind the running ones
    "multiplier 1, acks_late": (2, 2, 0, 2),  # only what runs
    "--disable-prefetch, early ack": (8, 2, 0, 0),  # prefetch_count unchanged, but nothing waits
}
got = {row["worker"]: (row["prefetch_count"], row["active"], row["reserved"],
                       row["HLEN unacked (its queue)"]) for row in held}
assert got == expected, got
assert [row["LLEN (still in Redis)"] for row in held] == [16 - a - rs for _, a, rs, _ in
                                                          expected.values()]
for i in range(len(HOLD)):
    r.delete(f"hold-{i}")  # the rest need not run

# %% [markdown]
# Read the table as a worker's budget:
#
# * With **early ack** a running task is already acknowledged, so it does not count: the default
#   worker runs 2 *and* holds 8 more. Multiplier 1 still holds 2 behind the 2 running ones.
# * With **`acks_late`**, running tasks count against the prefetch count: multiplier 1 holds
#   exactly what it runs, nothing waits inside the worker.
# * **`--disable-prefetch`** leaves `prefetch_count` at 8 but refuses to fetch while the worker
#   has as many tasks as processes (`celery/worker/consumer/tasks.py` wraps the channel's
#   `can_consume`): nothing waits inside the worker even with early ack.
#
# ## ETA tasks raise what a worker holds
#
# A message with an ETA or a countdown is fetched at once and kept in the worker until it is due
# (`scheduled()`), and each one **raises the prefetch count by one**
# (`celery/worker/strategy.py`), so that it does not take a slot from ready work. Twenty-four
# tasks due in a minute, to the default worker and to the capped one (`worker_eta_task_limit =
# 10`):

# %%
for queue in ("eta", "capped"):
    for _ in range(24):
        ch06_tasks.work.apply_async((0.01,), queue=queue, countdown=60)
prefetch.wait_steady(stack, lambda: (r.llen("eta"), r.llen("capped"), r.hlen("unacked")),
                     what="the ETA workers' fetching")
eta_rows = prefetch.held_now(stack, [eta_free, eta_capped], ["eta", "capped"])
plots.table(eta_rows)

# %%
free_row, capped_row = eta_rows
assert (free_row["prefetch_count"], free_row["scheduled"], free_row["LLEN (still in Redis)"]) \
    == (8 + 24, 24, 0), "all 24 held: far more than 4 x concurrency"
assert (capped_row["prefetch_count"], capped_row["scheduled"]) == (10, 10)
assert capped_row["LLEN (still in Redis)"] == 14, "the rest stay in Redis"

# %% [markdown]
# The cap did its job: 10, not 32. But look at what it costs. The capped worker's 10 slots are
# all taken by tasks due in a minute, so **ready work cannot get in** either. One plain task to
# each worker:

# %%
ready = {q: ch06_tasks.work.apply_async((0.01,), queue=q).id for q in ("eta", "capped")}
done_free = stack.wait_for([ready["eta"]], timeout=10)[0]
# the same chance for the capped worker: its queue must stay as it is for 1 s
left = prefetch.wait_steady(stack, lambda: r.llen("capped"), steady=1.0, what="the capped queue")
received = any(a.received for a in stack.records([ready["capped"]]))
print(f"default worker: the plain task finished {done_free.latency:.2f} s after it was sent. "
      f"Capped worker: {'received it' if received else 'did not take it'}; "
      f"{left} messages wait in its queue")

# %%
assert not received and left == 15, "the capped worker fetches nothing until an ETA falls due"

# %% [markdown]
# The cap has a second cost, and it lasts. It limits only the *increases*: each ETA task that
# falls due still *decreases* the prefetch count by one (`Consumer.apply_eta_task` calls
# `qos.decrement_eventually()`, `celery/worker/consumer/consumer.py`; kombu keeps it at 1 or
# more). Once the ETA volume reaches the cap, the increments it dropped are never given back:
# after those tasks have run, the worker holds a smaller window than it started with, and keeps
# it until it restarts or reconnects to the broker (which rebuilds the QoS at its initial count). Fresh workers, twelve tasks due in 2 s to each:

# %%
stack.stop_workers()  # the held ETA messages go back to their queues (kombu recreates the lists)
for q in ("eta", "capped"):
    r.delete(q)  # and nobody needs them
eta_free = stack.worker("ch06_tasks", name="eta", queues=["eta"], concurrency=2)
eta_capped = stack.worker("ch06_capped_tasks", name="capped", queues=["capped"], concurrency=2)
stack.start_workers(eta_free, eta_capped)
soon = [ch06_tasks.work.apply_async((0.01,), queue=q, countdown=2).id
        for q in ("eta", "capped") for _ in range(12)]
stack.wait_for(soon, timeout=30)
hosts = [eta_free.hostname, eta_capped.hostname]


def prefetch_counts():
    stats = stack.control.control.inspect(hosts, timeout=3).stats() or {}
    return tuple(stats.get(h, {}).get("prefetch_count") for h in hosts)


after_eta = prefetch.wait_steady(stack, prefetch_counts, steady=1.0, what="the prefetch counts")
print(f"prefetch_count after the ETA tasks ran: default worker {after_eta[0]}, "
      f"capped worker {after_eta[1]} (both started at 2 x 4 = 8)")

# %%
assert after_eta == (8, 1), after_eta  # 8 + 12 - 12; min(8 + 12, 10) - 12, kept at 1 or more
stack.stop_workers()

# %% [markdown]
# A capped worker whose ETA volume reached the cap now fetches one message at a time: with
# `acks_late` it also *runs* its plain (non-ETA) tasks one at a time, whatever its concurrency
# (the prefetch count bounds unacknowledged messages, running ones included), until it restarts
# or reconnects. So use `worker_eta_task_limit`
# only as a memory guard for a worker whose ETA volume should never reach it (set it well above
# concurrency × multiplier plus the ETA tasks you expect), watch for it being reached, and restart
# a worker that did. The other lever: countdowns and retries on **their own queue, consumed by
# workers of their own**. The prefetch window belongs to the worker, not the queue, so a separate
# queue helps only when a separate worker consumes it; and a retry goes back to the task's own
# routing unless `self.retry(queue=...)` names another. And remember chapter 4: a held ETA
# message that waits longer than the visibility timeout is delivered again.
#
# ## Two workers, one queue: long and short tasks
#
# The first report, live. Two `-c 2` workers share a queue; three 1.5 s tasks are sent, then ten
# 0.05 s ones. Four settings run side by side (eight workers, each pair on its own queue), so
# they share the machine's load. Only the settings differ.

# %%
SETTINGS = {
    "multiplier 4, early ack (default)": {"prefetch_multiplier": 4, "acks_late": False},
    "multiplier 1, early ack": {"prefetch_multiplier": 1, "acks_late": False},
    "multiplier 1, acks_late": {"prefetch_multiplier": 1, "acks_late": True},
    "--disable-prefetch, early ack": {"disable_prefetch": True, "acks_late": False},
}
LONG_S = 1.5
mixed = prefetch.run_mixed(stack, SETTINGS, app="ch06_tasks", task="ch06_tasks.work",
                           late_task="ch06_tasks.work_late", n_long=3, long_seconds=LONG_S,
                           n_short=10, short_seconds=0.05)
base = mixed["multiplier 4, early ack (default)"]
plots.table([{"setting": label, "makespan s": m["makespan"],
              "makespan / default": m["makespan"] / base["makespan"],
              "short p95 s": m["short p95"], "short p95 / default": m["short p95"] / base["short p95"],
              "longest short wait in a reserve s": m["short wait in a reserve"],
              "tasks per worker": sorted(m["tasks per worker"].values())}
             for label, m in mixed.items()])

# %%
long_ids = {a.id for m in mixed.values() for a in m["attempts"] if a.runtime > LONG_S / 2}
plots.timelines({label: m["attempts"] for label, m in mixed.items()},
                f"Two -c 2 workers sharing a queue: 3 tasks of {LONG_S} s, then 10 of 0.05 s",
                highlight={a.id for m in mixed.values() for a in m["attempts"]} - long_ids);

# %%
ratio = {label: (m["makespan"] / base["makespan"], m["short p95"] / base["short p95"])
         for label, m in mixed.items()}
assert base["short wait in a reserve"] > 0.8 * LONG_S, "default: shorts waited behind a long task"
assert mixed["multiplier 1, early ack"]["short wait in a reserve"] > 0.8 * LONG_S, \
    "multiplier 1 alone still holds 2 per worker: a short task waited a whole long one"
for label in ("multiplier 1, acks_late", "--disable-prefetch, early ack"):
    makespan, p95 = ratio[label]
    # typically well under half of the default's; under 75% even with a busy machine beside
    assert p95 < 0.75 and makespan < 1.05, (label, ratio[label])
    assert mixed[label]["short wait in a reserve"] < 0.25 * LONG_S, "they waited in Redis instead"

# %% [markdown]
# In the default run, one worker took two long tasks *and* a share of the short ones: its two
# children were busy for 1.5 s, so its short tasks waited in its reserve (orange bars after the
# long ones) while the other worker finished its own shorts and went idle. Multiplier 1 alone
# does not help: with early ack each worker still holds two messages behind the two running.
# With multiplier 1 **and** `acks_late`, or with `--disable-prefetch`, a worker whose children
# are all busy holds nothing more: the short tasks stay in Redis until a free child's worker asks
# for them. Short-task p95 fell to a fraction of the default's (the table's ratio column: the
# assertion above asks for under 75%), and the makespan did not grow (asserted: under 1.05x
# the default's), because no child idled while work waited elsewhere.
#
# That is why long tasks want **multiplier 1 with `acks_late`** (or `worker_disable_prefetch`):
# a message should wait where every worker can still take it, in the broker.
#
# **Prefetch cannot starve a task inside one worker.** The worker's main process hands reserved
# tasks to whichever child is free (`-O fair`, the default since Celery 4, governs only that
# parent-to-child step; `celery/concurrency/asynpool.py` maps `-O default` to the same `fair`
# strategy). One worker (`-c 2`, multiplier 4, early ack) gets one long task and then four short
# ones: the short ones run on its free child at once, not after the long one.

# %%
one = stack.spawn_worker("ch06_tasks", name="one", queues=["one"], concurrency=2,
                         prefetch_multiplier=4)
long_one = ch06_tasks.work.apply_async((1.5,), queue="one")
stack.started(long_one.id)
shorts_one = [ch06_tasks.work.apply_async((0.05,), queue="one") for _ in range(4)]
long_run = stack.wait_for([long_one.id], timeout=15)[0]
short_runs = stack.wait_for([s.id for s in shorts_one], timeout=15)
ran_beside = sum(a.started < long_run.finished for a in short_runs)
print(f"{ran_beside} of 4 short tasks started while the long one ran; "
      f"{len({a.pid for a in short_runs} - {long_run.pid})} other child ran them")
handoff = long_run.started - long_run.sent  # the reference: this worker's pace right now
if 4 * (0.05 + handoff) < 1.0:  # four shorts fit well inside the long one's 1.5 s
    assert ran_beside == 4 and long_run.pid not in {a.pid for a in short_runs}
else:
    print(f"Not judged: the machine is too busy right now (the long task took {handoff:.2f} s "
          f"from send to start, so four short ones cannot be shown inside its 1.5 s).")
one.stop()

# %% [markdown]
# ## Where prefetch could help: many tiny tasks
#
# Prefetch exists to hide the broker's round trip: while a child runs one task, the next message
# is already in the worker. So measure the round trip, and what a tiny task costs Celery. Each
# worker below (`-c 2`) finds 250 messages waiting at once (published to a side list, then
# `RENAME`d into its queue), and we time it draining them. In the same cell, raw `LPUSH` and
# `BRPOP` on the same Redis: the floor a broker round trip sets. (Kombu's Redis transport makes
# three round trips per message: the `BRPOP`, a `ZADD`+`HSET` transaction (MULTI/EXEC, one round
# trip) into `unacked_index` and `unacked` on delivery, a `ZREM`+`HDEL` one on ack: `QoS.append`
# and `QoS.ack` in
# `kombu/transport/redis.py`. Prefetch can hide only the first: the fetch.)

# %%
TINY = {  # label: (worker setting, task)
    "acks_late, multiplier 1": ({"prefetch_multiplier": 1}, "ch06_tasks.tiny_late"),
    "acks_late, multiplier 4": ({"prefetch_multiplier": 4}, "ch06_tasks.tiny_late"),
    "acks_late, multiplier 16": ({"prefetch_multiplier": 16}, "ch06_tasks.tiny_late"),
    "early ack, multiplier 4 (default)": ({"prefetch_multiplier": 4}, "ch06_tasks.tiny"),
    "default + ignore_result": ({"prefetch_multiplier": 4}, "ch06_tasks.tiny_quiet"),
}
drainers = [prefetch.workers_for(stack, "ch06_tasks", setting, queue=f"tiny-{i}",
                                 names=[f"tiny{i}"])[0] for i, (setting, _) in enumerate(TINY.values())]
stack.start_workers(*drainers)
stack.clear_records()  # a shorter recording to read
rates = prefetch.drain_rates(stack, {label: (task, f"tiny-{i}", 250, ())
                                     for i, (label, (_, task)) in enumerate(TINY.items())})
raw = prefetch.raw_redis_rates(r)
stack.stop_workers()
plots.log_bars({**{label: m["tasks/s"] for label, m in rates.items()},
                "raw LPUSH": raw["LPUSH/s"], "raw BRPOP": raw["BRPOP/s"]},
               "Tiny tasks drained by one -c 2 worker, vs raw Redis", "per second (log scale)");

# %%
celery_rate = rates["early ack, multiplier 4 (default)"]["tasks/s"]
by_multiplier = {label: m["tasks/s"] / rates["acks_late, multiplier 4"]["tasks/s"]
                 for label, m in rates.items() if label.startswith("acks_late")}
quiet = rates["default + ignore_result"]["tasks/s"] / celery_rate
per_task_ms = 2 / celery_rate * 1000  # two children: each spends this long per task
round_trip_ms = 1000 / raw["BRPOP/s"]
print(f"Celery: {celery_rate:.0f} tasks/s = {per_task_ms:.2f} ms per task per child; "
      f"raw BRPOP {raw['BRPOP/s']:.0f}/s = {round_trip_ms:.3f} ms per round trip; "
      f"Celery / raw = {celery_rate / raw['BRPOP/s']:.3f}")
print(f"the most prefetch could hide: one round trip per task = "
      f"{round_trip_ms / per_task_ms:.1%} of a task's cost")
print("measured, relative to multiplier 4:", {k: round(v, 2) for k, v in by_multiplier.items()},
      f"| ignore_result: {quiet:.2f}x the default")

# %%
assert celery_rate < 0.25 * raw["BRPOP/s"], "the broker round trip is not what limits Celery here"
assert round_trip_ms < 0.1 * per_task_ms, "so prefetch can hide only a small share of the cost"
stored = lambda label: sum(r.exists(f"celery-task-meta-{i}") for i in rates[label]["ids"])  # noqa: E731
assert stored("early ack, multiplier 4 (default)") == 250 and stored("default + ignore_result") == 0

# %% [markdown]
# On a local Redis a round trip costs a small fraction of what Celery spends on each task
# (decoding, the pool hand-off, the result write, this course's recorder), and prefetch can only
# hide round trips: the bound printed above. So the multipliers differ here by run-to-run noise
# (run the cell again and the order changes; on the reference machine they landed within ±15% of
# each other across repeated runs, in no steady order). Prefetch pays off when the round trip is
# long next to the task: a broker across a network (a millisecond or more a round trip against a
# task of a millisecond), or RabbitMQ, which pushes prefetched messages without a request each.
# `ignore_result=True` drops a Redis read and a write with its publish per task (the backend
# reads the stored state before it writes, `celery/backends/base.py`) (no result was stored, as
# counted above): it matters for tasks nobody waits on, and leaves no `celery-task-meta-*` keys.
#
# ## How much concurrency? Little's law
#
# A queue stays short only if the workers can take work as fast as it arrives. **Little's law**:
# the number of tasks in service on average = arrival rate × time in service. So for 50 calls a
# second to a service that answers in 0.05 s, 50 × 0.05 = 2.5 children are busy on average: you
# need at least **3**. With 2, at most 2 / 0.05 = 40 tasks a second get done, so for as long as
# 50 a second arrive, the queue grows by about 10 a second (Little's law describes a queue that
# keeps up; this one never settles). Predict, then measure each `-c`'s
# capacity (the most it can take): four workers with `-c` 1, 2, 3, 4 each drain 10 × c waiting
# 0.05 s tasks (so each should take about 0.5 s). Then the arrival process itself: 50 tasks a
# second for 2 s to the `-c 2` worker and to the `-c 3` worker, each queue's depth read as they
# come.

# %%
SERVICE_S, ARRIVAL = 0.05, 50
needed = ARRIVAL * SERVICE_S
sizes = [1, 2, 3, 4]
sized = [stack.worker("ch06_tasks", name=f"c{c}", queues=[f"io-{c}"], concurrency=c,
                      prefetch_multiplier=1) for c in sizes]
stack.start_workers(*sized)
stack.clear_records()
drained = prefetch.drain_rates(stack, {c: ("ch06_tasks.work", f"io-{c}", 10 * c, (SERVICE_S,))
                                       for c in sizes}, together=True)
capacity = {c: m["tasks/s"] for c, m in drained.items()}


def arrive(queue):  # one of the 50 a second
    ch06_tasks.work.apply_async((SERVICE_S,), queue=queue)


depths = {"io-2": [], "io-3": []}
arrivals = observe.run_load({q: (arrive, ARRIVAL) for q in depths}, 2.0,
                            tick=0.02, on_tick=lambda: [d.append(observe.depth(r, q))
                                                         for q, d in depths.items()])
grew = {q: d[-1] - d[len(d) // 4] for q, d in depths.items()}  # over the last three quarters
stack.wait_until(lambda: not any(observe.depth(r, q) for q in depths), 20, "the queues to drain")
stack.stop_workers()
plots.table([{"-c": c, "predicted tasks/s (c / service time)": c / SERVICE_S,
              "measured tasks/s": capacity[c], "vs -c 1": capacity[c] / capacity[1],
              f"keeps up with {ARRIVAL}/s?": capacity[c] >= ARRIVAL,
              f"queue after {ARRIVAL}/s for 2 s": depths.get(f"io-{c}", ["-"])[-1]} for c in sizes])

# %%
print(f"Little's law: {ARRIVAL}/s x {SERVICE_S} s = {needed:.1f} busy children needed on average")
print(f"queue growth over the last 1.5 s of arrivals: {grew}")
kept_rate = min(arrivals["sent"].values()) >= 0.9 * ARRIVAL * 2  # the producer kept its pace
# taken per second during the arrivals: did -c 2 work as fast as when its capacity was measured?
taken = {q: (arrivals["sent"][q] - d[-1]) / 2.0 for q, d in depths.items()}
steady = taken["io-2"] >= 0.85 * capacity[2]
if kept_rate:
    assert grew["io-2"] >= 5, "2 children fall behind 50 a second: the queue grows"
if capacity[1] >= 0.85 / SERVICE_S and kept_rate:  # one child kept its pace: not the machine
    assert capacity[4] > 2.5 * capacity[1] and capacity[3] > 2 * capacity[1], capacity
    assert grew["io-2"] > grew["io-3"] + 5, "-c 2 falls behind, -c 3 does not"
    if capacity[3] >= 0.9 * ARRIVAL and steady:  # 3 children could take 50/s, then and now
        assert grew["io-3"] < 5, "3 children keep up with 50/s"
    else:
        print(f"Too busy to judge '3 children keep up with 50/s' right now: -c 3 managed "
              f"{capacity[3]:.0f}/s, and -c 2 took {taken['io-2']:.0f}/s of its {capacity[2]:.0f}.")
else:  # the workers' main processes, not the children, set the pace on a busy machine
    print(f"This machine is too busy to judge the scaling and the 50/s claim right now: one child "
          f"managed {capacity[1]:.1f} tasks/s of its {1 / SERVICE_S:.0f}, the producer sent "
          f"{arrivals['sent']} in 2 s.")
    assert capacity[4] > 1.5 * capacity[1], capacity  # still: more children, more done
    assert grew["io-2"] >= grew["io-3"], "-c 2 falls behind at least as fast as -c 3"

# %% [markdown]
# The measured capacity follows c / service time closely for waiting (I/O-bound) work, a little
# below it (each task also costs Celery a millisecond or two). Size for the peak arrival rate,
# with headroom: at 100% busy any burst queues. For CPU-bound work the ceiling is the number of
# cores (chapter 2), whatever `-c` says.
#
# ## Autoscaling: let the pool follow the load
#
# `--autoscale=4,1` keeps between 1 and 4 children: it grows when the worker has more tasks than
# processes, and shrinks once it has fewer tasks than processes and `AUTOSCALE_KEEPALIVE`
# seconds have passed since it last grew or received a task (an environment variable, 30 by
# default: `celery/worker/autoscale.py`; 1 s here, to watch it). A
# burst of sixteen 0.3 s tasks, and the pool's children counted from the OS every 50 ms:

# %%
auto = stack.spawn_worker("ch06_tasks", name="auto", queues=["auto"], concurrency=4,
                          prefetch_multiplier=1, extra_args=["--autoscale=4,1"],
                          env={"AUTOSCALE_KEEPALIVE": "1"})
print(" ".join(auto.typed_command), "  with AUTOSCALE_KEEPALIVE=1")
before = len(auto.children())
burst = [ch06_tasks.work.apply_async((0.3,), queue="auto").id for _ in range(16)]
pool = prefetch.sample_pool(auto, 10, until=lambda s: max(n for _, n in s) == 4 and s[-1][1] == 1)
finished = max(a.finished for a in stack.wait_for(burst)) - min(
    a.sent for a in stack.records(burst))
auto.stop()
plots.steps(pool, f"--autoscale=4,1: pool size during a burst (tasks done at {finished:.1f} s)",
            "pool children");

# %%
print(f"children before {before}, most {max(n for _, n in pool)}, last {pool[-1][1]} "
      f"(at {pool[-1][0]:.1f} s)")
assert before == 1 and max(n for _, n in pool) == 4 and pool[-1][1] == 1
assert pool[-1][0] > finished, "it shrank only after the burst was done"

# %% [markdown]
# The pool grew to its maximum as the burst arrived and went back to one child one to two
# keepalives after it last received a task, and not before its tasks were done: the autoscaler
# checks on a timer, every keepalive seconds (`hub.call_repeatedly(keepalive, maybe_scale)`,
# `celery/worker/autoscale.py`), and shrinks only when fewer tasks are held than processes and it
# last grew or received a task more than a keepalive before that check. Autoscaling
# saves memory between bursts; it does not make a burst faster
# than a fixed pool of the maximum size, and each grow costs a fork.
#
# ## Try it
#
# Pick the multiplier, the ack mode, `--disable-prefetch`, the concurrency and the mix; each run
# boots two workers with your setting and two with the default, side by side, and shows both
# timelines with makespan and short-task p95 as ratios to the default. (The logic is
# `celerylab.prefetch.run_mixed`, used above.)

# %%
widgets.prefetch_explorer(stack, app="ch06_tasks", task="ch06_tasks.work",
                          late_task="ch06_tasks.work_late")

# %% [markdown]
# ## Lab 6
#
# [labs/lab06_prefetch_settings.ipynb](../labs/lab06_prefetch_settings.ipynb) (your copy, in your workspace): two workers share a queue of long and short tasks; choose
# the prefetch, ack mode and concurrency so that short tasks stop waiting behind long ones,
# without making the whole batch slower.

# %%
stack.stop()
