"""Lab checkers: each runs the learner's code against the live stack and says what passed.

A checker prints one line per thing it verified and ends with a pass message, or raises
``LabCheckFailed`` with a hint that names the symptom without giving the answer away. In Jupyter the
failure shows as a short message, not a stack trace (``CourseError._render_traceback_``).
"""

from __future__ import annotations

import datetime as dt

from celerylab.errors import CourseError
from celerylab.processes import pid_alive


class LabCheckFailed(CourseError, AssertionError):
    """The lab's answer does not do what the lab asks yet; the message is a hint."""


def ok(text: str) -> None:
    print(f"  ok  {text}")


def call_learner(fn, *args, what: str):
    """Call the learner's function; turn a stub or a crash into a hint."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise LabCheckFailed(f"{what} is not written yet: replace the `raise NotImplementedError` "
                             "line with your code, run that cell, then run this check again.") from None
    except LabCheckFailed:
        raise
    except Exception as exc:
        raise LabCheckFailed(f"{what} raised {type(exc).__name__}: {exc}\n"
                             "Run it by hand on the example above to see where it breaks.") from None


# Lab 1 ---------------------------------------------------------------------------------------
LAB01_QUEUE = "lab01-check"
LAB01_KEYS = ("task", "id", "args", "kwargs", "retries", "eta")


def _lab01_enqueue(stack) -> list[dict]:
    """Publish known messages (no worker consumes this queue) and return what each should show."""
    app = stack.control
    stack.redis.delete(LAB01_QUEUE)
    plan = [
        ("shop.charge", [42, "EUR"], {"idempotency_key": "k-1"}, {}),
        ("shop.send_receipt", ["ada@example.com"], {}, {"countdown": 3600}),
        ("shop.charge", [7, "GBP"], {}, {"retries": 2}),
        ("reports.build", [], {"month": "2026-11", "tags": ["café", 3]}, {}),
        ("shop.refund", [[1, 2], {"why": "duplicate"}], {}, {}),
    ]
    expected = []
    for name, args, kwargs, opts in plan:
        res = app.send_task(name, args=args, kwargs=kwargs, queue=LAB01_QUEUE, **opts)
        expected.append({"task": name, "id": res.id, "args": args, "kwargs": kwargs,
                         "retries": opts.get("retries", 0), "countdown": "countdown" in opts})
    return expected


def _same_eta(got, has_countdown: bool) -> bool:
    if not has_countdown:
        return got is None
    if isinstance(got, dt.datetime):
        got = got.isoformat()
    try:
        when = dt.datetime.fromisoformat(str(got))
    except ValueError:
        return False
    now = dt.datetime.now(when.tzinfo) if when.tzinfo else dt.datetime.now()
    return dt.timedelta(minutes=50) < when - now < dt.timedelta(minutes=70)


def check_lab01(pending_messages, stack) -> None:
    """Lab 1: ``pending_messages(r, queue)`` lists a queue's messages, oldest first, unconsumed."""
    r = stack.redis
    empty = call_learner(pending_messages, r, "lab01-no-such-queue", what="pending_messages")
    if empty != []:
        raise LabCheckFailed(f"For a queue with no messages it returned {empty!r}; expected [].")
    ok("an empty queue gives []")

    expected = _lab01_enqueue(stack)
    before = r.llen(LAB01_QUEUE)
    got = call_learner(pending_messages, r, LAB01_QUEUE, what="pending_messages")
    after = r.llen(LAB01_QUEUE)
    if after != before:
        raise LabCheckFailed(f"The queue held {before} messages before your function ran and "
                             f"{after} after: it consumed them. Read the list without removing "
                             "anything (which Redis list commands only read?).")
    ok(f"nothing consumed ({after} messages still queued)")
    if not isinstance(got, list) or not all(isinstance(m, dict) for m in got):
        raise LabCheckFailed(f"Expected a list of dicts, got {type(got).__name__}.")
    if len(got) != len(expected):
        raise LabCheckFailed(f"The queue holds {len(expected)} messages; you returned {len(got)}.")
    missing = [k for k in LAB01_KEYS if k not in got[0]]
    if missing:
        raise LabCheckFailed(f"Each dict needs the keys {list(LAB01_KEYS)}; missing: {missing}.")
    ids = [m["id"] for m in got]
    want_ids = [m["id"] for m in expected]
    if sorted(map(str, ids)) != sorted(want_ids):
        raise LabCheckFailed("The ids you returned are not the ids of the queued messages. "
                             "Where in the envelope does the task id live?")
    if ids == want_ids[::-1]:
        raise LabCheckFailed("Right messages, wrong order: the first item should be the oldest, "
                             "the one a worker would take next. Which end of the list do producers "
                             "push to, and which end do workers pop from?")
    if ids != want_ids:
        raise LabCheckFailed("Right messages, but not in queue order (oldest first).")
    ok("every message, oldest first")
    for want, m in zip(expected, got, strict=True):
        if m["task"] != want["task"]:
            raise LabCheckFailed(f"Message {want['id'][:8]}: task is {m['task']!r}, expected the "
                                 "task name the producer sent. Look at the headers.")
        if isinstance(m["args"], (str, bytes)):
            raise LabCheckFailed("args came back as text: the body is encoded. Decode it (its "
                                 "encoding is in properties.body_encoding), then parse the JSON.")
        if list(m["args"]) != want["args"] or dict(m["kwargs"]) != want["kwargs"]:
            raise LabCheckFailed(f"Message {want['task']}: args/kwargs are {m['args']!r} / "
                                 f"{m['kwargs']!r}, expected {want['args']!r} / {want['kwargs']!r}. "
                                 "The decoded body is a list of three things: which are they?")
        if m["retries"] != want["retries"]:
            raise LabCheckFailed(f"Message {want['task']}: retries is {m['retries']!r}, expected "
                                 f"{want['retries']}. It is a header, not part of the body.")
        if not _same_eta(m["eta"], want["countdown"]):
            raise LabCheckFailed(f"Message {want['task']}: eta is {m['eta']!r}. A message sent "
                                 "with a countdown carries its ETA in a header; the others carry "
                                 "None.")
    ok("task, id, args, kwargs, retries and eta match what was sent")
    r.delete(LAB01_QUEUE)
    print("Lab 1 passed: you can read a queue without touching it.")


# Lab 2 ---------------------------------------------------------------------------------------
# Sized so that the deciding factor is how many waits a layout overlaps (robust on a loaded
# 2-core machine), while CPU-bound tasks stuck behind waiting ones still miss the target.
LAB02_CPU = (8, 1_500_000)  # 8 CPU-bound tasks of ~0.08 s each
LAB02_IO = (60, 0.5)  # 60 I/O-bound tasks waiting 0.5 s each
LAB02_TARGET = 40.0  # tasks per second, first publish to last finish (a good layout: ~60)
POOLS = ("prefork", "threads", "solo")


def _validate_layout(layout) -> list[dict]:
    if not isinstance(layout, (list, tuple)) or not 1 <= len(layout) <= 2:
        raise LabCheckFailed("Return a list of one or two workers, each a dict with "
                             "'pool', 'concurrency' and 'queues'.")
    for spec in layout:
        if not isinstance(spec, dict) or {"pool", "concurrency", "queues"} - set(spec):
            raise LabCheckFailed(f"Each worker is a dict with 'pool', 'concurrency' and "
                                 f"'queues'; got {spec!r}.")
        if spec["pool"] not in POOLS:
            raise LabCheckFailed(f"pool must be one of {POOLS}; got {spec['pool']!r}.")
        if not isinstance(spec["concurrency"], int) or not 1 <= spec["concurrency"] <= 32:
            raise LabCheckFailed("concurrency must be a whole number from 1 to 32.")
    served = {q for spec in layout for q in spec["queues"]}
    for queue in ("cpu", "io"):
        if queue not in served:
            raise LabCheckFailed(f"No worker consumes the queue {queue!r}: its tasks would wait "
                                 "forever.")
    return list(layout)


def run_lab02_workload(stack, layout, time_bound: float = 8.0) -> dict:
    """Start the layout's workers, run the lab's workload on them, stop them; report figures."""
    layout = _validate_layout(layout)
    for queue in ("cpu", "io"):
        stack.redis.delete(queue)
    workers = [stack.worker("celerylab.workloads", name=f"lab02-{i}", pool=spec["pool"],
                            concurrency=spec["concurrency"], queues=list(spec["queues"]),
                            prefetch_multiplier=1)
               for i, spec in enumerate(layout)]
    stack.start_workers(*workers)
    try:
        send = stack.control.send_task  # by name: the task code lives in celerylab.workloads
        (n_cpu, size), (n_io, wait) = LAB02_CPU, LAB02_IO
        cpu = [send("celerylab.workloads.crunch", (size,), queue="cpu").id for _ in range(n_cpu)]
        io = [send("celerylab.workloads.wait_io", (wait,), queue="io").id for _ in range(n_io)]
        try:
            stack.wait_for(cpu + io, timeout=time_bound)
        except Exception:
            pass  # reported below as unfinished tasks
        done = [a for a in stack.records(cpu + io) if a.state == "SUCCESS"]
    finally:
        stack.stop_workers()
    total = n_cpu + n_io
    first = min((a.sent for a in stack.records(cpu + io) if a.sent), default=0)
    last = max((a.finished for a in done), default=first)

    def span(ids):
        runs = [a for a in done if a.id in set(ids)]
        return (max(a.finished for a in runs) - min(a.started for a in runs)) if runs else None

    elapsed = last - first if len(done) == total else time_bound
    return {"finished": len(done), "total": total, "seconds": elapsed,
            "tasks/s": len(done) / elapsed if elapsed > 0 else 0.0,
            "cpu seconds": span(cpu), "io seconds": span(io)}


def check_lab02(choose_layout, stack) -> None:
    """Lab 2: a layout of pools and concurrency that reaches the throughput target."""
    layout = call_learner(choose_layout, what="choose_layout")
    _validate_layout(layout)
    ok(f"layout: {layout}")
    fig = run_lab02_workload(stack, layout)
    print(f"  measured {fig['tasks/s']:.1f} tasks/s ({fig['finished']}/{fig['total']} tasks in "
          f"{fig['seconds']:.2f} s); target {LAB02_TARGET:.0f} tasks/s")
    if fig["tasks/s"] >= LAB02_TARGET and fig["finished"] == fig["total"]:
        ok("throughput target reached")
        print("Lab 2 passed: the pool fits the work.")
        return
    n_cpu, n_io = LAB02_CPU[0], LAB02_IO[0]
    hints = []
    if fig["cpu seconds"] is None or fig["cpu seconds"] > 1.2:
        took = "never finished" if fig["cpu seconds"] is None else f"took {fig['cpu seconds']:.1f} s"
        hints.append(f"The {n_cpu} CPU-bound tasks {took} from first start to last finish. "
                     "Did they run in parallel? Which pool gives "
                     "real parallelism for pure-Python work, and how many cores are there?")
    if fig["io seconds"] is None or fig["io seconds"] > 1.5:
        took = "never finished" if fig["io seconds"] is None else f"took {fig['io seconds']:.1f} s"
        hints.append(f"The {n_io} I/O-bound tasks {took}; each "
                     f"one mostly waits {LAB02_IO[1]} s. How many can your layout wait on at once?")
    raise LabCheckFailed(f"{fig['tasks/s']:.1f} tasks/s is below the target of "
                         f"{LAB02_TARGET:.0f}.\n" + "\n".join(hints or [
                             "Both kinds ran reasonably; the two compete for the same workers?"]))


# Lab 3 ---------------------------------------------------------------------------------------
LAB03_TASKS = {"lookup": "celerylab.workloads.lookup",
               "slow": "celerylab.workloads.render_report",
               "hungry": "celerylab.workloads.import_catalog"}
LAB03_TARGET_P95 = 0.3  # seconds, sent to finished, for the lookups (a good layout: ~0.03)
LAB03_MAX_CONCURRENCY = 6  # children or threads in all, across the workers


def _lab03_layout(plan) -> tuple[dict, list[dict]]:
    if not isinstance(plan, dict) or {"routes", "workers"} - set(plan):
        raise LabCheckFailed("routing_plan() returns a dict with 'routes' and 'workers'.")
    workers = plan["workers"]
    if not isinstance(workers, (list, tuple)) or not 1 <= len(workers) <= 3:
        raise LabCheckFailed("'workers' is a list of one to three worker dicts.")
    for spec in workers:
        if not isinstance(spec, dict) or {"queues", "concurrency"} - set(spec):
            raise LabCheckFailed(f"Each worker needs 'queues' and 'concurrency'; got {spec!r}.")
        if spec.get("pool", "prefork") not in POOLS:
            raise LabCheckFailed(f"pool must be one of {POOLS}; got {spec.get('pool')!r}.")
        cap = spec.get("max_memory_per_child")
        if cap is not None and (not isinstance(cap, int) or cap < 50 * 1024):
            raise LabCheckFailed("max_memory_per_child is in KiB and at least 51200 (50 MiB): a "
                                 "fresh child alone uses ~50 MiB.")
    total = sum(int(spec["concurrency"]) for spec in workers)
    if total > LAB03_MAX_CONCURRENCY:
        raise LabCheckFailed(f"The layout uses {total} children/threads; this machine's budget "
                             f"is {LAB03_MAX_CONCURRENCY}. Spend them where they matter.")
    return plan["routes"], list(workers)


def _lab03_producer(stack, routes):
    from celery import Celery
    app = Celery("lab03-producer", broker=stack.url, backend=stack.url, set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    task_routes=routes, task_default_queue="celery")
    return app


def check_lab03(routing_plan, stack) -> None:
    """Lab 3: routes and workers that keep lookups fast while slow and hungry work runs."""
    import time

    from celerylab.recording import percentile

    plan = call_learner(routing_plan, what="routing_plan")
    routes, specs = _lab03_layout(plan)
    app = _lab03_producer(stack, routes)
    queue_of = {kind: app.amqp.router.route({}, name, (), {})["queue"].name
                for kind, name in LAB03_TASKS.items()}
    served = {q for spec in specs for q in spec["queues"]}
    for kind, queue in queue_of.items():
        if queue not in served:
            raise LabCheckFailed(f"{LAB03_TASKS[kind]} is routed to the queue {queue!r}, which no "
                                 "worker consumes: those tasks would wait forever.")
    ok(f"routes: {queue_of}; every queue has a worker")

    for q in set(queue_of.values()):
        stack.redis.delete(q)
    workers = []
    for i, spec in enumerate(specs):
        cap = spec.get("max_memory_per_child")
        workers.append(stack.worker(
            "celerylab.workloads", name=spec.get("name") or f"lab03-{i}",
            queues=list(spec["queues"]), concurrency=int(spec["concurrency"]),
            pool=spec.get("pool", "prefork"), prefetch_multiplier=4,
            extra_args=["--max-memory-per-child", str(cap)] if cap else []))
    stack.start_workers(*workers)
    try:
        slow = [app.send_task(LAB03_TASKS["slow"], (1.0,)).id for _ in range(6)]
        hungry = [app.send_task(LAB03_TASKS["hungry"], (150,)).id for _ in range(2)]
        lookups = []
        for i in range(30):  # steady traffic while the slow and hungry work runs
            lookups.append(app.send_task(LAB03_TASKS["lookup"], (i,)).id)
            time.sleep(0.03)
        done = {a.id: a for a in stack.wait_for(slow + hungry + lookups, timeout=30)}
        p95 = percentile([done[i].latency for i in lookups], 95)
        lookup_hosts = {done[i].host for i in lookups}
        hungry_runs = [done[i] for i in hungry]
        if p95 > LAB03_TARGET_P95:
            shared = [k for k in ("slow", "hungry") if queue_of[k] == queue_of["lookup"]]
            busy = [w.hostname for w in workers if w.hostname in lookup_hosts
                    and {queue_of["slow"], queue_of["hungry"]} & set(w.queues)]
            where = (f"in the queue {queue_of['lookup']!r}, together with the "
                     f"{' and '.join(shared)} tasks" if shared else
                     f"on {', '.join(busy)}, which also serves other work" if busy else
                     f"in the queue {queue_of['lookup']!r}")
            raise LabCheckFailed(f"lookup p95 is {p95:.2f} s; the target is {LAB03_TARGET_P95} s. "
                                 f"The lookups waited {where}. What else could they be stuck "
                                 "behind, and how do you give them a line of their own?")
        ok(f"lookup p95 {p95:.3f} s (target {LAB03_TARGET_P95} s)")
        if {a.host for a in hungry_runs} & lookup_hosts:
            raise LabCheckFailed("import_catalog ran on the same worker as the lookups: every "
                                 "import parks 150 MiB next to latency-sensitive work. Give it a "
                                 "worker of its own.")
        pids = {a.pid for a in hungry_runs}
        try:
            stack.wait_until(lambda: not any(pid_alive(p) for p in pids), 10, "the hungry children")
        except CourseError:
            raise LabCheckFailed(
                f"The children that ran import_catalog (pids {sorted(pids)}) are still alive, "
                "each holding 150 MiB. Which worker setting replaces a child after a task that "
                "left it too big?") from None
        ok("memory-hungry work ran apart, and its children were replaced after it")
    finally:
        stack.stop_workers()
    print("Lab 3 passed: slow and hungry work can no longer hold the fast path hostage.")



# Lab 4 ---------------------------------------------------------------------------------------
LAB04_TASK = "lab04_tasks.apply_payment"


def _message_location(r, task_id: str, queue: str = "celery") -> str:
    import json
    if any(json.loads(m)["headers"]["id"] == task_id for m in r.lrange(queue, 0, -1)):
        return "queue"
    if any(json.loads(v)[0]["headers"]["id"] == task_id for v in r.hvals("unacked")):
        return "unacked"
    return "gone"


def _bank_calls(r) -> list[str]:
    return [c.decode() for c in r.lrange("bank:calls", 0, -1)]


def check_lab04(stack) -> None:
    """Lab 4: every payment applied exactly once through a worker crash and a duplicate send."""
    from celerylab.workers import WorkerError

    r = stack.redis
    stack.reset()
    worker = stack.worker("lab04_tasks", name="payments", concurrency=2, prefetch_multiplier=1)
    try:
        worker.start()
    except WorkerError as exc:
        if "NotImplementedError" in str(exc):
            raise LabCheckFailed("lab04_tasks.py still has a `raise NotImplementedError` line: "
                                 "write your code there, re-run the %%writefile cell, then this "
                                 "check.") from None
        raise LabCheckFailed(f"The worker could not import lab04_tasks.py:\n{exc}") from None
    send = stack.control.send_task
    amounts = {"A": 1000, "B": 2000, "C": 300, "D": 40, "E": 5}

    def pay(k):
        return send(LAB04_TASK, (f"pay-{k}", f"acct-{k}", amounts[k]))

    def reached(call, res):
        def ready():
            if res.state == "FAILURE":
                raise LabCheckFailed(f"apply_payment failed: {res.result!r}. Run it by hand "
                                     "(start a worker, send one payment) to see why.")
            return call in _bank_calls(r)
        return stack.wait_until(ready, 15, f"the bank call {call}")

    try:
        a = pay("A")
        reached("notify:pay-A", a)  # A is credited and in its last, slow call
        b = pay("B")
        reached("authorize:pay-B", b)  # B is in its first call, not credited yet
        worker.kill()
        if _message_location(r, b.id) == "gone":
            raise LabCheckFailed(
                "The worker died while pay-B was in the bank's authorize call, and pay-B's "
                "message is gone from Redis: it will never be applied. When is a message "
                "acknowledged by default, and how do you make that happen later?")
        ok("a crash mid-payment left the payments' messages in Redis")
        worker.start()
        stack.wait_until(lambda: a.state == b.state == "SUCCESS", 25,
                         "pay-A and pay-B to be redelivered and finish")
        rest = [pay("C"), pay("D"), pay("E"), pay("E")]  # E twice: a client retrying its request
        stack.wait_until(lambda: all(x.state in ("SUCCESS", "FAILURE") for x in rest), 20,
                         "the remaining payments")
    finally:
        stack.stop_workers()
    balances = {k: int(r.hget("balances", f"acct-{k}") or 0) for k in amounts}
    print(f"  balances (cents): {balances}")
    if balances["A"] != amounts["A"]:
        raise LabCheckFailed(
            f"acct-A holds {balances['A']}, expected {amounts['A']}. pay-A was credited, then the "
            "worker died before the task returned; its message came back and ran again. How can "
            "the task recognise a payment it has already applied?")
    if balances["E"] != amounts["E"]:
        raise LabCheckFailed(
            f"acct-E holds {balances['E']}, expected {amounts['E']}: the client sent pay-E twice "
            "(same payment id), and it was applied twice. Recognise duplicates by payment id.")
    missing = [k for k in amounts if balances[k] != amounts[k]]
    if missing:
        raise LabCheckFailed(f"Wrong balances for {missing}: expected {amounts}, got {balances}.")
    ok("each payment applied exactly once: through the crash, and when sent twice")
    print("Lab 4 passed: crash-safe and idempotent.")


# Lab 5 ---------------------------------------------------------------------------------------
LAB05_TASK = "lab05_tasks.sync_order"
LAB05_DEAD = "lab05:dead"
LAB05_MAX_CAP = 4  # seconds: the longest wait between attempts this checker sits through


def _lab05_module():
    import importlib
    import sys
    sys.modules.pop("lab05_tasks", None)
    try:
        return importlib.import_module("lab05_tasks")
    except NotImplementedError:
        raise LabCheckFailed("lab05_tasks.py still has a `raise NotImplementedError` line: write "
                             "your policy there, re-run the %%writefile cell, then this check.") \
            from None
    except Exception as exc:
        raise LabCheckFailed(f"lab05_tasks.py does not import: {type(exc).__name__}: {exc}") \
            from None


def _lab05_policy(mod) -> dict:
    task = mod.sync_order
    retry_for = tuple(getattr(task, "autoretry_for", ()) or ())
    policy = {"retry_for": retry_for, "backoff": getattr(task, "retry_backoff", False),
              "cap": getattr(task, "retry_backoff_max", 600),
              "jitter": getattr(task, "retry_jitter", True), "max_retries": task.max_retries}
    if not any(issubclass(mod.DependencyDown, e) for e in retry_for):
        raise LabCheckFailed("DependencyDown is not retried: a dependency that is down for a "
                             "moment should be tried again later (autoretry_for).")
    if any(issubclass(mod.InvalidOrder, e) for e in retry_for):
        raise LabCheckFailed("InvalidOrder would be retried, but a malformed order fails the same "
                             "way every time: retrying only delays its dead letter.")
    if not policy["backoff"]:
        raise LabCheckFailed("No backoff: every retry would wait the same default_retry_delay "
                             "(180 s unless set). Back off exponentially.")
    if policy["cap"] is None or policy["cap"] > LAB05_MAX_CAP:
        raise LabCheckFailed(f"retry_backoff_max is {policy['cap']} s; cap the backoff at "
                             f"{LAB05_MAX_CAP} s or less (this checker will not wait longer, and a "
                             "cap is what keeps a long outage from pushing delays to minutes).")
    if not policy["jitter"]:
        raise LabCheckFailed("retry_jitter is off: every caller that failed together retries "
                             "together, and hammers the dependency in waves.")
    if not isinstance(policy["max_retries"], int) or not 2 <= policy["max_retries"] <= 5:
        raise LabCheckFailed(f"max_retries is {policy['max_retries']!r}: allow 2 to 5 retries "
                             "(None would retry forever).")
    return policy


def check_lab05(replay_dead_letters, stack) -> None:
    """Lab 5: retries that recover transient failures, dead letters for permanent ones, replay."""
    import json

    r = stack.redis
    stack.reset()
    mod = _lab05_module()
    policy = _lab05_policy(mod)
    factor = int(max(1.0, float(policy["backoff"])))
    bounds = [min(policy["cap"], factor * 2**n) for n in range(policy["max_retries"])]
    ok(f"policy: retry {[e.__name__ for e in policy['retry_for']]}, backoff {factor} s x 2^n "
       f"capped at {policy['cap']} s, jitter, at most {policy['max_retries']} retries")

    r.hset("lab05:faults", mapping={"flaky-1": "down", "flaky-2": "down", "down-1": "down",
                                    "bad-1": "invalid"})
    r.hset("lab05:failures-left", mapping={"flaky-1": 2, "flaky-2": 2, "down-1": 1000})
    worker = stack.worker("lab05_tasks", name="sync", concurrency=4, prefetch_multiplier=1)
    try:
        worker.start()
        calls = {k: stack.control.send_task(LAB05_TASK, (k,))
                 for k in ("ok-1", "flaky-1", "flaky-2", "down-1", "bad-1")}
        try:
            stack.wait_until(lambda: all(stack.outcome(c.id) for c in calls.values()),
                             sum(bounds) + 10, "every call to succeed or give up")
        except CourseError:
            stuck = [k for k, c in calls.items() if not stack.outcome(c.id)]
            raise LabCheckFailed(f"After {sum(bounds) + 10} s these calls had not finished: "
                                 f"{stuck}.\nThe worker's log ends with:\n{worker.log_tail(15)}") \
                from None
        state = {k: stack.outcome(c.id) for k, c in calls.items()}

        def runs(key):
            return sorted((a for a in stack.records([calls[key].id]) if a.started),
                          key=lambda a: a.started)

        for key in ("ok-1", "flaky-1", "flaky-2"):
            if state[key] != "SUCCESS":
                raise LabCheckFailed(f"{key} failed twice, then would have succeeded, but it "
                                     f"ended in {state[key]}. Transient failures must "
                                     "succeed within the retry budget.")
        for key in ("flaky-1", "flaky-2"):
            attempts = runs(key)
            for n, (a, b) in enumerate(zip(attempts, attempts[1:], strict=False)):
                gap = b.started - a.finished
                if gap > bounds[n] + 0.75:
                    raise LabCheckFailed(f"{key}: retry {n + 1} came {gap:.1f} s after the failure; "
                                         f"your policy allows at most {bounds[n]} s.")
        ok(f"transient failures recovered within the budget; delays within {bounds[:2]} s")

        letters = [json.loads(x) for x in r.lrange(LAB05_DEAD, 0, -1)]
        by_order = {}
        for letter in letters:
            if not isinstance(letter, dict) or {"task", "args", "error", "attempts"} - set(letter):
                raise LabCheckFailed(f"A dead letter must be a JSON dict with task, id, args, "
                                     f"kwargs, error and attempts; found {letter!r}.")
            by_order[(letter["args"] or [None])[0]] = letter
        for key, attempts, exc in (("down-1", policy["max_retries"] + 1, "DependencyDown"),
                                   ("bad-1", 1, "InvalidOrder")):
            if state[key] != "FAILURE":
                raise LabCheckFailed(f"{key} should have failed for good; it ended {state[key]}.")
            letter = by_order.get(key)
            if letter is None:
                raise LabCheckFailed(f"{key} failed for good but is not in the dead-letter list "
                                     f"{LAB05_DEAD!r}. What runs once a task has failed for good?")
            if exc not in letter["error"]:
                raise LabCheckFailed(f"The dead letter of {key} says {letter['error']!r}; it "
                                     f"should name the error ({exc}).")
            if letter["attempts"] != attempts or len(runs(key)) != attempts:
                raise LabCheckFailed(f"{key} ran {len(runs(key))} times and its dead letter says "
                                     f"{letter['attempts']}; expected {attempts}.")
        if set(by_order) != {"down-1", "bad-1"}:
            raise LabCheckFailed(f"Only down-1 and bad-1 belong in the dead-letter list; found "
                                 f"{sorted(map(str, by_order))}.")
        ok("the outage and the malformed order are dead letters, with payload, error, attempts")

        r.delete("lab05:faults", "lab05:failures-left")  # the causes are fixed
        replayed = call_learner(replay_dead_letters, r, stack.control.send_task,
                                what="replay_dead_letters")
        replayed = [stack.control.AsyncResult(x) if isinstance(x, str) else x
                    for x in replayed or []]
        if len(replayed) != 2:
            raise LabCheckFailed(f"replay_dead_letters re-sent {len(replayed)} messages; the "
                                 "dead-letter list held 2.")
        stack.wait_until(lambda: all(x.state in ("SUCCESS", "FAILURE") for x in replayed), 15,
                         "the replayed tasks")
        if [x.state for x in replayed] != ["SUCCESS", "SUCCESS"] or r.llen(LAB05_DEAD):
            raise LabCheckFailed("After the fix, the replayed tasks should succeed and the "
                                 f"dead-letter list be empty (states {[x.state for x in replayed]},"
                                 f" {r.llen(LAB05_DEAD)} letters left).")
        ok("after the fix, the replay succeeded and emptied the dead-letter list")
    finally:
        stack.stop_workers()
    print("Lab 5 passed: transient failures retried with backoff, permanent ones parked and "
          "replayed.")
