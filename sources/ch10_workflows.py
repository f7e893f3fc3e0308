# %% [markdown]
# # Chapter 10 — Workflows: chain, group, chord, and how they fail
#
# Teams rarely run single tasks for long. An order becomes a **chain** (validate, charge, ship),
# a report a **chord** (one task per account, side by side, then one that combines them). Celery's
# canvas builds these from signatures, and it is where its guarantees are least intuitive: who
# sends the next step, what a crash between steps does, and how the result backend, which single
# tasks could ignore, quietly becomes part of the system.
#
# This chapter runs each workflow on a real worker and Redis, breaks it, and counts:
#
# 1. **a chain is one message at a time**, each step sent by the process that ran the one before;
# 2. **a failing step ends the chain**, a retrying step delays it; `.si` against `.s`; `link_error`;
# 3. **a crash mid-chain**, under early and late acknowledgement: which steps ran twice, which never;
# 4. **group and chord**: the keys a chord's join writes, a header task that fails or retries, a
#    chord whose state expired or was deleted, and what a big chord costs the backend;
# 5. **without a result backend**, and with `ignore_result`;
# 6. **alternatives**, measured side by side: a loop, a group, `chunks`; a chord or a counter.
#
# Steps note what they did in this notebook's Redis (`runs:<order>` lists), so every count below
# is read, not assumed.

# %%
import json
import os
import time
from itertools import pairwise

from celery import chain, chord, group
from celery.exceptions import ChordError

import celerylab
from celerylab.capstone import age_unacked

stack = celerylab.start("ch10")
db = stack.redis
print("broker and result backend:", stack.url)

# %% [markdown]
# ## The settings this chapter is about
#
# A canvas leans on the **result backend**: a chord's join is counted there, and a chain's
# failure is written there for the steps that never ran. Each setting below is written out with
# its celery 5.7 default, except one: kombu's sweep of unacknowledged messages runs every second,
# for section 3 (chapter 1).

# %%
# %%writefile ch10_tasks.py
"""Chapter 10's tasks: an order's steps and a report's parts, each noting what it did."""

import json
import os
import time
from datetime import timedelta

import redis
from celery import Celery

BROKER = os.environ["CELERYLAB_BROKER_URL"]
app = Celery("ch10_tasks", broker=BROKER, backend=BROKER)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    # --- the defaults of celery 5.7 a canvas leans on, written out ---
    task_acks_late=False,  # a step is acknowledged when it starts
    task_ignore_result=False,  # results are stored (a chord's join on Redis does not need them)
    result_expires=timedelta(days=1),  # results live a day...
    result_chord_expires=None,  # ...and a chord's state as long (None: result_expires)
    result_chord_join_timeout=3.0,  # s
    result_backend_transport_options={},  # result_chord_ordered: True (a sorted set)
    task_allow_error_cb_on_chord_header=False,  # a chord's link_error goes to its body only
    # not a default: kombu sweeps unacknowledged messages every second (about every 100 s)
    broker_transport_options={"unacked_restore_interval": 1, "unacked_restore_throttle": 1},
)
db = redis.Redis.from_url(BROKER)
CHARGE_ONCE = db.register_script(  # chapter 4's tool: the mark and the effect in one step
    "if redis.call('SET', KEYS[1], 1, 'NX', 'EX', 604800) then "
    "return redis.call('HINCRBY', 'charged', ARGV[1], 1) end return false")


def note(order, name, **fields):
    db.rpush(f"runs:{order}", json.dumps({"step": name, "pid": os.getpid(), **fields}))


@app.task(bind=True)
def step(self, trail, order, name, seconds=0.0, fail=False):
    """One step of an order: note who ran it and who sent it; pass the trail on."""
    note(order, name, origin=self.request.origin, trail=trail)
    time.sleep(seconds)
    if fail:
        raise ValueError(f"{name} failed for {order}")
    return (trail or []) + [name]


@app.task(bind=True, max_retries=3)
def flaky(self, trail, order, name):
    """Fails once (a gateway timeout, say), then succeeds on its retry 1 s later."""
    note(order, name, retries=self.request.retries)
    if self.request.retries == 0:
        raise self.retry(countdown=1)
    return (trail or []) + [name]


def _charge(trail, order, seconds):
    note(order, "charge")
    time.sleep(seconds)  # the payment gateway's slow part
    CHARGE_ONCE(keys=[f"charge:{order}"], args=[order])
    return (trail or []) + ["charge"]


charge = app.task(name="ch10_tasks.charge")(_charge)  # acknowledged early
charge_late = app.task(name="ch10_tasks.charge_late", acks_late=True)(_charge)


@app.task
def part(order, i, seconds=0.0, fail=False):
    """One part of a report (a chord's header task)."""
    note(order, f"part{i}")
    time.sleep(seconds)
    if fail:
        raise ValueError(f"part {i} failed")
    return i


@app.task(bind=True, max_retries=3)
def flaky_part(self, order, i):
    note(order, f"part{i}", retries=self.request.retries)
    if self.request.retries == 0:
        raise self.retry(countdown=1)
    return i


@app.task
def part_loop(order, n, seconds):
    """All of a report's parts in one task, one after another."""
    for _ in range(n):
        time.sleep(seconds)
    note(order, "loop")
    return n


COUNT_PART = db.register_script("""
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], 604800)
if redis.call('HLEN', KEYS[1]) == tonumber(ARGV[3]) then
    return redis.call('SET', KEYS[2], 1, 'NX', 'EX', 604800) and 1 or 0
end
return 0""")


@app.task(ignore_result=True)
def counted_part(order, i, n):
    """A part that joins by itself: it records its value and, if it completes the count, claims
    the right to send the body (once) and sends it."""
    note(order, f"part{i}")
    if COUNT_PART(keys=[f"parts:{order}", f"body:{order}"], args=[i, i, n]):
        combined.apply_async((order,), ignore_result=True)


@app.task(ignore_result=True)
def combined(order):
    values = [int(v) for v in db.hvals(f"parts:{order}")]
    note(order, "combine", values=values)


@app.task
def combine(values, order):
    """A chord's body: runs once every header task has returned."""
    note(order, "combine", values=values)
    return sum(values)


@app.task
def report_error(request, exc, traceback):
    """An error callback (link_error): Celery calls it in the process that stores the failure
    (for a chord's body, the process of the header task that completed the count)."""
    db.rpush("errors", json.dumps({"task": request.task, "id": request.id, "exc": repr(exc),
                                   "pid": os.getpid()}))

# %%
import ch10_tasks as t
from celery import Celery

defaults = Celery(set_as_current=False).conf
for key in ("task_acks_late", "task_ignore_result", "result_expires", "result_chord_expires",
            "result_chord_join_timeout",
            "result_backend_transport_options", "task_allow_error_cb_on_chord_header"):
    assert t.app.conf[key] == defaults[key], key  # written out, and still the defaults


def runs(order):
    """What each step of an order noted, in order."""
    return [json.loads(r) for r in db.lrange(f"runs:{order}", 0, -1)]


def steps(order):
    return [r["step"] for r in runs(order)]


def errors():
    return [json.loads(e) for e in db.lrange("errors", 0, -1)]


def keys():
    """How many keys hold results and joins: celery's (`celery-task-meta-<id>`, a chord's
    `celery-taskset-meta-<group id>.*`) and section 6's counter (`parts:*`, `body:*`)."""
    return sum(1 for k in db.scan_iter(count=1000)
               if k.startswith((b"celery-task-meta-", b"celery-taskset-meta-", b"parts:", b"body:")))

# %% [markdown]
# ## 1. A chain is one message at a time
#
# `chain(a, b, c)` does not queue three messages. It sends **one**: step `a`, with the rest of
# the chain inside its body. When `a` returns, the process that ran it sends `b`, with its
# result as `b`'s first argument (a *partial* signature, `.s`), and so on. We send a chain with no
# worker running and look at the queue; then start one.

# %%
order = "o-1"
flow = chain(t.step.s(None, order, "validate"), t.step.s(order, "charge"),
             t.step.s(order, "ship"), t.step.si(None, order, "notify"))
result = flow.apply_async()
queued = [json.loads(m) for m in db.lrange("celery", 0, -1)]
args, kwargs, embed = json.loads(__import__("base64").b64decode(queued[0]["body"]))
print("messages in the queue:", len(queued), "  first step:", queued[0]["headers"]["task"], args)
print("the rest, inside its body:", [s["task"] + str(s["args"]) for s in reversed(embed["chain"])])
assert len(queued) == 1 and len(embed["chain"]) == 3

# %%
w = stack.spawn_worker("ch10_tasks", name="w1", concurrency=2, prefetch_multiplier=1)
print("result:", result.get(timeout=10))
for r in runs(order):
    print(f"  {r['step']:8}  ran in pid {r['pid']}, sent by {r['origin']}, got {r['trail']}")
ran = runs(order)
for before, after in pairwise(ran):  # each step was sent by the pid that ran the one before
    assert after["origin"].startswith(f"gen{before['pid']}@")
assert ran[0]["origin"].startswith(f"gen{os.getpid()}@")  # the kernel sent only the first
assert ran[2]["trail"] == ["validate", "charge"] and ran[3]["trail"] is None  # .s vs .si

# %% [markdown]
# The `origin` header names the process that published a message (`gen<pid>@<host>`): `charge` was
# sent by the pool process that ran `validate`, `ship` by the one that ran `charge`. The kernel
# sent only the first. So a chain's progress lives in the messages themselves: no coordinator
# holds it, and nothing outside the running step knows what comes next.
#
# `notify` was an **immutable** signature (`.si`): it got the arguments written in it, not the
# trail. Use `.si` for a step that must not depend on the one before (a notification), `.s` to
# pass a result on.
#
# ## 2. A failing step, a retrying step, and `link_error`
#
# Now `charge` raises. `link_error` on a chain is linked to each of its steps
# (`_chain.prepare_steps`); celery calls the error callback in the process that saw the failure
# (a task whose parameters are `(request, exc, traceback)` is called there directly, not sent).

# %%
order = "o-2"
failing = chain(t.step.s(None, order, "validate"), t.step.s(order, "charge", fail=True),
                t.step.s(order, "ship"))
failing.link_error(t.report_error.s())
result = failing.apply_async()
try:
    result.get(timeout=10)
except ValueError as exc:
    print("result.get() raised:", repr(exc))
stack.wait_until(lambda: len(errors()) == 1, 5, "the error callback")
print("steps that ran:", steps(order), " queue:", db.llen("celery"))
print("states: validate", result.parent.parent.state, "| charge", result.parent.state,
      "| ship", result.state)
print("error callback:", errors())
assert steps(order) == ["validate", "charge"] and db.llen("celery") == 0
assert (result.parent.parent.state, result.parent.state, result.state) == \
    ("SUCCESS", "FAILURE", "FAILURE")
assert errors()[0]["task"] == "ch10_tasks.step" and "charge failed" in errors()[0]["exc"]
assert errors()[0]["pid"] == runs(order)[1]["pid"]  # called in the process that ran charge

# %% [markdown]
# `ship` never ran and no message for it exists: a failed step **ends** the chain. Its result is
# not left `PENDING`, though: celery 5.7 writes the failure into the result of every step that
# will never run (`Backend._fail_chain`), so whoever waits on the chain's result gets the error.
# The error callback ran once, for the step that failed.
#
# A step that **retries** does not end the chain: the retry is a new message with the same task
# id, and the next step is sent when the retry succeeds. The chain is late by the countdown.

# %%
order = "o-3"
t0 = time.monotonic()
print(chain(t.step.s(None, order, "validate"), t.flaky.s(order, "charge"),
            t.step.s(order, "ship")).apply_async().get(timeout=10))
late_by = time.monotonic() - t0
print(f"steps: {steps(order)}, done after {late_by:.2f} s (the retry's countdown: 1 s)")
assert steps(order) == ["validate", "charge", "charge", "ship"] and late_by >= 1.0

# %% [markdown]
# ## 3. A crash mid-chain
#
# Two orders, each stopped in the middle of a 1.5 s `charge`, by one SIGKILL of the whole worker
# (a host lost, the OOM killer taking the main process). Order `early` charges with a task
# acknowledged when it starts (the default), order `late` with `acks_late=True`. The charge
# itself is idempotent (chapter 4's mark and effect in one Lua script). Then the worker comes
# back, with the visibility timeout (an hour) fast-forwarded for the dead worker's messages, as
# in chapter 4.

# %%
crashed = {}
for order, task in (("early", t.charge), ("late", t.charge_late)):
    crashing = chain(t.step.s(None, order, "validate"), task.s(order, 1.5),
                     t.step.s(order, "ship"))
    crashing.link_error(t.report_error.s())
    crashed[order] = crashing.apply_async()
stack.wait_until(lambda: steps("early")[-1:] == ["charge"] and steps("late")[-1:] == ["charge"],
                 10, "both charges running")
w.kill()
held = db.hlen("unacked")
print("worker SIGKILLed; messages it held unacknowledged:", held)
age_unacked(db, {json.loads(m)[0]["headers"]["id"] for m in db.hvals("unacked")})
w.start()
stack.wait_until(lambda: steps("late")[-1:] == ["ship"] and db.llen("celery") == 0
                 and db.hlen("unacked") == 0, 15, "order late to finish, and nothing left")
charged = {k.decode(): int(v) for k, v in db.hgetall("charged").items()}
for order in ("early", "late"):
    print(f"{order:6} steps started: {steps(order)}  charged: {charged.get(order, 0)}")
print("error callbacks for either:", [e for e in errors() if "early" in e["exc"] or "late" in e["exc"]])
assert held == 1 and steps("early") == ["validate", "charge"] and "early" not in charged
assert steps("late") == ["validate", "charge", "charge", "ship"] and charged["late"] == 1
assert crashed["late"].get(timeout=5) and crashed["early"].state == "PENDING"
assert len(errors()) == 1  # section 2's: none for either crash

# %% [markdown]
# | order | `charge` started | charged | `ship` | error callback | what the team sees |
# |---|---|---|---|---|---|
# | `early` (acknowledged at start) | once | never | never ran | none | nothing: no message, no error, a result `PENDING` forever |
# | `late` (`acks_late`) | **twice** | once (idempotent) | once | none | the order finishes, late |
#
# Under early acknowledgement the crash **ended the chain in silence**: the running step's message
# was already acknowledged, and the next step is only ever sent by a step that returns. No error
# callback ran: `link_error` is called by a process that sees an exception, and the process was
# killed. Under `acks_late` the running step came back (after the visibility timeout, an hour
# in production) and ran again, so each step must be idempotent, and the rest followed.
# A chain also has a window of its own, which this cell does not hit: a step's process sends the
# next step as soon as the step's function returns, before it stores the result and before a late
# acknowledgement (`celery/app/trace.py`), so a crash in that instant, under `acks_late`, runs the
# step again **and sends the next step twice**. Idempotent steps make that harmless too.
#
# So a workflow needs a check that does not depend on any of its own steps running: a sweep that
# finds orders started long ago with no outcome (chapter 7's oldest age, for workflows). Lab 10
# builds one.
#
# ## 4. Group and chord
#
# A **group** sends its tasks at once; a **chord** is a group (the *header*) plus a *body* that
# runs once every header task has returned, with their results. On a Redis result backend the
# join is counted in Redis itself: each header task, when it ends, runs a Lua script that adds its
# result to the chord's state and, when the count is reached, claims the right to send the body.
# Let's watch the keys.

# %%
def chord_keys():
    """The chord state's keys (suffix -> type) in the result backend."""
    return {k.decode().rsplit(".", 1)[-1]: db.type(k).decode()
            for k in db.scan_iter("celery-taskset-meta-*")}


order = "r-1"
result = chord([t.part.s(order, i, seconds=0.4) for i in range(4)], t.combine.s(order)).apply_async()
during = chord_keys()
joining = stack.wait_until(lambda: (keys := chord_keys()).get("j") and keys, 5,
                           "the header's first results")
print("sum:", result.get(timeout=10))
# the header task that sent the body cleans up right after sending it
after = stack.wait_until(lambda: (keys := chord_keys()) and "s" not in keys and keys, 5,
                         "the chord's clean-up")
marker = next(db.scan_iter("celery-taskset-meta-*.c"))
done_marker, marker_ttl = db.get(marker), db.ttl(marker)
ttl = db.ttl(f"celery-task-meta-{result.id}")
print("while it runs:", during, "\nas parts return:", joining, "\nafter the body ran:", after,
      "=", done_marker, f"\nthe body's result expires in {ttl} s (result_expires)")
assert during == {"s": "string"} and {"s", "j", "d"} <= set(joining) and after == {"c": "string"}
assert done_marker == b"done" and 290 < marker_ttl <= 300 and 86000 < ttl <= 86400

# %% [markdown]
# * `.s` (the chord's **size**) is written when the chord is sent, with the chord's expiry
#   (`result_chord_expires`, which falls back to `result_expires`), renewed each time a header
#   task returns;
# * as header tasks return: `.j` holds their results (a sorted set: `result_chord_ordered`),
#   `.d` the ids already counted, so a header task delivered twice counts once (celery 5.7);
# * the one that completes the count claims `.c`, sends the body, deletes the rest, and leaves
#   `.c` = `done` for five minutes (its TTL, read above), so a late duplicate cannot send the
#   body again.
#
# Each header task's own result stays too (`celery-task-meta-<id>`), for a day.
#
# Now a header task **fails for good**, another header task **retries** once, and, on a team
# that keeps results for 2 s to save memory (a second app, `result_expires=2`), a chord whose
# state **expires** before its header is done; then one whose keys are **deleted** mid-chord
# (an operator's clean-up of `celery-*` keys, or a `FLUSHDB` of the result backend).

# %%
# %%writefile ch10_brief_tasks.py
"""The same report parts, on an app that keeps results for 2 s."""

import os

from celery import Celery

app = Celery("ch10_brief_tasks", broker=os.environ["CELERYLAB_BROKER_URL"],
             backend=os.environ["CELERYLAB_BROKER_URL"])
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                broker_connection_retry_on_startup=True, task_default_queue="brief",
                result_expires=2)  # s: too short for a chord whose header takes longer
import ch10_tasks  # noqa: E402, F401 (its tasks are shared: this app runs them too)

# %%
from ch10_brief_tasks import app as brief

w_brief = stack.spawn_worker("ch10_brief_tasks", name="brief", queues=["brief"], concurrency=2)
expiring = chord([brief.signature("ch10_tasks.part", ("r-exp", i, 3.0)) for i in range(2)],
                 brief.signature("ch10_tasks.combine", ("r-exp",))).apply_async()
deleted = chord([t.part.s("r-del", i, 1.0) for i in range(2)], t.combine.s("r-del")).apply_async()

failed = chord([t.part.s("r-fail", i, fail=(i == 1)) for i in range(3)], t.combine.s("r-fail"))
failed.link_error(t.report_error.s())
failed = failed.apply_async()
retried = chord([t.part.s("r-retry", 0), t.flaky_part.s("r-retry", 1)], t.combine.s("r-retry"))
retried = retried.apply_async()
stack.wait_until(lambda: "part0" in steps("r-del"), 5, "r-del's header running")
for key in db.scan_iter(f"celery-taskset-meta-{deleted.parent.id}.*"):  # a clean-up, mid-chord
    db.delete(key)
try:
    failed.get(timeout=10)
    raised = None
except ValueError as exc:  # the result apply_async returned checks its parent, the header, first
    raised = exc
print("r-fail: result.get() raised", repr(raised))
chord_errors = stack.wait_until(lambda: [e["exc"] for e in errors() if "ChordError" in e["exc"]],
                                5, "the body's error callback")
print("r-fail's body:", failed.state, repr(failed.result), "\n  error callback:", chord_errors)
print("r-retry:", retried.get(timeout=10), steps("r-retry"))
assert "combine" not in steps("r-fail") and isinstance(failed.result, ChordError)
assert sorted(steps("r-fail")) == ["part0", "part1", "part2"] and "part 1" in str(raised)
left = {k.decode().rsplit(".", 1)[-1] for k in db.scan_iter(f"celery-taskset-meta-{failed.parent.id}.*")}
print("r-fail's chord state left behind:", sorted(left))
assert {"j", "d"} <= left and "s" not in left  # the size deleted; the results stay
assert len(chord_errors) == 1 and "part 1 failed" in chord_errors[0]
assert steps("r-retry")[-1] == "combine" and sorted(runs("r-retry")[-1]["values"]) == [0, 1]

# %%
headers = [r.id for res in (expiring, deleted) for r in res.parent.results]
stack.wait_until(lambda: all(a.finished for a in stack.records(headers)) and len(headers) == 4
                 and len(stack.records(headers)) == 4, 10, "both headers done")
# a header task's last act is its part of the join: a body would be queued or running by now
assert db.llen("brief") == db.llen("celery") == db.hlen("unacked") == 0
for name, res in (("r-exp", expiring), ("r-del", deleted)):
    print(f"{name}: steps {steps(name)}, body {res.state}, header",
          [r.state for r in res.parent.results])
said = [line for line in w_brief.log_tail(200).splitlines() if "ERROR" in line or "WARNING" in line]
said += [line for line in w.log_tail(400).splitlines() if deleted.parent.id in line]
print("a word about either in the workers' logs:", said)
assert "combine" not in steps("r-exp") and "combine" not in steps("r-del")
assert expiring.state == deleted.state == "PENDING" and said == []
assert {r.state for r in deleted.parent.results} == {"SUCCESS"}
w_brief.stop()

# %% [markdown]
# | chord | header | body | error | what the team sees |
# |---|---|---|---|---|
# | a header task fails | the others ran | never ran | `ChordError: Dependency ... raised ...`, stored as the body's result (the `.get()` of what `apply_async` returned raises the header's own error first), given to the body's `link_error`; `.j` and `.d` left for the chord's expiry (and the dispatch claim `.c` for seconds) | an error, if someone looks at the body |
# | a header task retries | all ran | ran, with every value | none | the report, late |
# | its state expired (the chord's expiry shorter than a gap between header returns, or before the first) | all ran | never ran | **none** | nothing: `PENDING` forever |
# | its keys deleted mid-chord | all ran | never ran | **none** | nothing |
#
# The body's error callback was called once, with the `ChordError`: with
# `task_allow_error_cb_on_chord_header=False` (the default) a chord's `link_error` is linked to its
# body only. Celery 5.7 says, in a `CPendingDeprecationWarning` that Python hides by default, that
# this default is pending deprecation; with `True`, each header task gets the callback too.
#
# The header's last task found no chord size (`.s`) and so nothing to complete: no error, no log
# line. Keep the chord's expiry (`result_chord_expires`, or `result_expires`) far longer than any
# header can take, including its retries and a redelivery an hour later; never delete `celery-*`
# keys of a live system; and watch the workflow from outside (section 3's sweep).
#
# A chord's cost is in the backend. A chord over 300 tiny tasks:

# %%
before_bytes = db.info("memory")["used_memory"]
result = chord([t.part.s("big", i) for i in range(300)], t.combine.s("big")).apply_async()
peak = 0
while not result.ready():
    peak = max([peak] + [db.memory_usage(k) or 0 for k in db.scan_iter("celery-taskset-meta-*.j")])
    time.sleep(0.01)
ids = [r.id for r in result.parent.results] + [result.id]
stack.wait_until(lambda: not db.exists(f"celery-taskset-meta-{result.parent.id}.s"), 5,
                 "the chord's clean-up")
added_keys = db.exists(*[f"celery-task-meta-{i}" for i in ids]) + len(
    list(db.scan_iter(f"celery-taskset-meta-{result.parent.id}.*")))
added_bytes = db.info("memory")["used_memory"] - before_bytes
print(f"sum {result.get()}: {added_keys} keys left ({added_bytes / 1024:.0f} KiB), each kept "
      f"for a day; the join's results peaked at {peak / 1024:.1f} KiB while it ran")
assert added_keys == 302  # a result per header task, one for the body, the done marker

# %% [markdown]
# One key per header task, kept for `result_expires`: a chord over a million accounts a day is a
# million keys in the backend, all the time. Whether that matters depends on the Redis it shares.
#
# ## 5. Without a result backend
#
# A chain needs nothing from a backend: its progress travels in the messages, so a sender with
# no backend can start one (here the worker's app still has one). A chord cannot even be sent
# without one. And `ignore_result=True` on header tasks does **not** break a chord on Redis:
# the worker still hands each header task's result to the chord's join, it just does not store
# it under the task's own id (`Backend.mark_as_done`). A group's results, though, cannot be
# collected.

# %%
bare = Celery("ch10_tasks", broker=stack.url, set_as_current=False)  # no backend
bare.conf.update(task_serializer="json", accept_content=["json"])
try:
    chord([bare.signature("ch10_tasks.part", ("bare", 0))],
          bare.signature("ch10_tasks.combine", ("bare",))).apply_async()
    refused = ""
except NotImplementedError as exc:
    refused = str(exc).splitlines()[0]
print("chord without a backend:", refused)
chain(bare.signature("ch10_tasks.step", (None, "bare", "a")),
      bare.signature("ch10_tasks.step", ("bare", "b"))).apply_async()
stack.wait_until(lambda: steps("bare") == ["a", "b"], 5, "the chain without a backend")
print("chain without a backend ran:", steps("bare"))

result = chord([t.part.s("quiet", i).set(ignore_result=True) for i in range(3)],
               t.combine.s("quiet")).apply_async()
print("chord over ignore_result tasks:", result.get(timeout=10))
g = group(t.part.s("quiet-g", i).set(ignore_result=True) for i in range(3)).apply_async()
stack.wait_until(lambda: len(stack.records([r.id for r in g.results])) == 3 and all(
    a.finished for a in stack.records([r.id for r in g.results])), 5, "the group's tasks to end")
stored = db.exists(*[f"celery-task-meta-{r.id}" for r in g.results])
print("their group's tasks ended; results stored:", stored, "; ready:", g.ready())
assert refused and steps("bare") == ["a", "b"] and result.result == 3
assert stored == 0 and not g.ready()

# %% [markdown]
# ## 6. Alternatives, side by side
#
# 200 items of 5 ms work each, three ways: one task that loops over them, a group of 200 tasks,
# and `chunks` (a group of 10 tasks of 20 items each). Times come from the recording (first
# start to last finish); the result keys from the backend.

# %%
def measured(signature):
    stack.clear_records()
    signature.apply_async().get(timeout=30)
    # a result is stored just before its task's last recorded event (task_postrun)
    done = stack.wait_until(lambda: (found := stack.records()) and all(
        a.finished for a in found) and found, 5, "the recording of every task's end")
    makespan = max(a.finished for a in done) - min(a.started for a in done)
    stored = db.exists(*[f"celery-task-meta-{a.id}" for a in done])
    return {"messages": len(done), "makespan": makespan, "result keys": stored}


WORK = 0.005
ways = {"one task, a loop": t.part_loop.s("loop", 200, WORK),
        "a group of 200": group(t.part.s("g", i, WORK) for i in range(200)),
        "chunks of 20": t.part.chunks([("c", i, WORK) for i in range(200)], 20).group()}
for name, sig in ways.items():
    ways[name] = measured(sig)
    print(f"{name:18} {ways[name]['messages']:4} messages  {ways[name]['makespan']:.2f} s  "
          f"{ways[name]['result keys']:4} keys added")
loop, each, chunked = ways.values()
assert (loop["messages"], each["messages"], chunked["messages"]) == (1, 200, 10)
assert (loop["result keys"], each["result keys"], chunked["result keys"]) == (1, 200, 10)
ratio = chunked["makespan"] / each["makespan"]
print(f"chunks took {ratio:.0%} of the group's time")
if ratio > 0.9:
    print("(this machine is too busy right now to show the difference: run the cell again)")

# %% [markdown]
# The loop runs on one process; the group spreads over both but pays a message, a result and a
# bookkeeping round per item; `chunks` pays them per chunk. Which wins depends on the work per
# item against that overhead, measured here, not assumed. What the loop gives up is isolation:
# one item that fails or crashes fails them all, and a retry redoes all of them.
#
# A chord is not the only join. Header tasks can count themselves: each records its value in
# one Lua step, and the one that completes the count claims (`SET NX`) the right to send the body,
# once (`counted_part` in `ch10_tasks.py`). Side by side, 50 parts each way:

# %%
def all_idle():
    return db.llen("celery") == 0 and all(a.finished for a in stack.records())


def keys_added(send, order):
    stack.clear_records()
    before = keys()
    send()
    stack.wait_until(lambda: "combine" in steps(order) and all_idle(), 10, f"{order}'s body")
    return keys() - before


by_chord = keys_added(lambda: chord([t.part.s("joined", i) for i in range(50)],
                                    t.combine.s("joined")).apply_async(), "joined")
by_counter = keys_added(lambda: [t.counted_part.delay("counted", i, 50) for i in range(50)],
                        "counted")
print(f"keys left in Redis: chord {by_chord}, counter {by_counter};  body runs: chord "
      f"{steps('joined').count('combine')}, counter {steps('counted').count('combine')}")
assert by_chord >= 52 and by_counter == 2
assert steps("joined").count("combine") == steps("counted").count("combine") == 1
assert sorted(runs("counted")[-1]["values"]) == list(range(50))

# %% [markdown]
# The counter keeps two keys (the values and the claim) with an expiry you chose; the chord keeps
# a result per part for `result_expires`. The counter is yours to test, though: its join is one
# Lua script and one `SET NX`, and chapter 4's crash tests apply to it.
#
# ## What to watch
#
# | failure | what the team sees | what bounds it | test | metric |
# |---|---|---|---|---|
# | a step fails for good | the chain's result raises; later steps never sent | `link_error` that records the order; a dead letter (ch. 5) | a step that raises | failed workflows per hour |
# | a step fails, then succeeds | the chain is late | retries with backoff (ch. 5), idempotent steps | a step that fails once | retries per step |
# | worker killed mid-chain, early ack | **nothing**: the chain stops, no error | `acks_late` + idempotent steps; a sweep for old unfinished workflows | SIGKILL mid-step, count steps | oldest unfinished workflow's age |
# | worker killed mid-chain, `acks_late` | a step runs twice (a window sends the next twice) | idempotent steps (ch. 4) | SIGKILL mid-step, count effects | duplicate effects |
# | a chord's header task fails | `ChordError` on the body; the body never runs | a body errback; a body that handles partial results | a header task that raises | chords failed |
# | a chord's state expired or deleted | **nothing**: the body never runs | the chord's expiry (`result_chord_expires`, `result_expires`) far above the longest gap between header returns; a sweep | expire or delete mid-chord | oldest unfinished workflow's age |
# | a big chord | a key per task for `result_expires`; backend memory | `chunks`, a counter, shorter result expiry (with care) | a chord of N, count keys | backend memory, keys |
#
# ## Lab 10
#
# [labs/lab10_order_workflow.ipynb](../labs/lab10_order_workflow.ipynb) (your copy, in your
# workspace): an order workflow (validate, charge, a chord of shipments, a receipt) that charges
# once, never sends a receipt for an order that did not ship, and records every order that
# cannot finish where a team will see it.

# %%
stack.stop()
