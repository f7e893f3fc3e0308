"""Lab 3 checker: routes and workers that keep the fast path fast."""

from __future__ import annotations

from celerylab.checks.common import POOLS, LabCheckFailed, call_learner, checker, ok
from celerylab.errors import CourseError
from celerylab.processes import pid_alive

LAB03_TASKS = {"lookup": "celerylab.workloads.lookup",
               "slow": "celerylab.workloads.render_report",
               "hungry": "celerylab.workloads.import_catalog"}
# The lookups' p95 latency (sent to finished) is judged against a baseline measured in the same
# check: the same workload with every task in one queue, served by one worker with the whole
# budget. Its p95 is made of the slow tasks' sleeps (head-of-line blocking), not of CPU speed, so
# the ratio holds on a busy machine. A good layout: ~1-3% of it; sharing a worker: ~100%.
LAB03_TARGET_RATIO = 0.25
LAB03_MAX_CONCURRENCY = 6  # children or threads in all, across the workers
# what a worker dict may say (each is a `celery worker` flag); anything else is refused, not
# silently dropped
LAB03_KEYS = {"name", "queues", "concurrency", "pool", "max_memory_per_child",
              "max_tasks_per_child"}


def _lab03_layout(plan) -> tuple[dict, list[dict]]:
    if not isinstance(plan, dict) or {"routes", "workers"} - set(plan):
        raise LabCheckFailed("routing_plan() returns a dict with 'routes' and 'workers'.")
    workers = plan["workers"]
    if not isinstance(workers, (list, tuple)) or not 1 <= len(workers) <= 3:
        raise LabCheckFailed("'workers' is a list of one to three worker dicts.")
    for spec in workers:
        if not isinstance(spec, dict) or {"queues", "concurrency"} - set(spec):
            raise LabCheckFailed(f"Each worker needs 'queues' and 'concurrency'; got {spec!r}.")
        unknown = sorted(set(spec) - LAB03_KEYS)
        if unknown:
            raise LabCheckFailed(
                f"A worker dict has {unknown[0]!r}, which this lab does not pass to the worker: "
                f"it would be ignored, and your layout judged without it. The keys it knows: "
                f"{', '.join(sorted(LAB03_KEYS))}.")
        queues = spec["queues"]
        if not isinstance(queues, (list, tuple)) or not queues or \
                not all(isinstance(q, str) and q for q in queues):
            raise LabCheckFailed(f"A worker's 'queues' is a list of queue names; got {queues!r}.")
        if not isinstance(spec["concurrency"], int) or spec["concurrency"] < 1:
            raise LabCheckFailed(f"'concurrency' is a whole number of at least 1; got "
                                 f"{spec['concurrency']!r}.")
        if spec.get("pool", "prefork") not in POOLS:
            raise LabCheckFailed(f"pool must be one of {POOLS}; got {spec.get('pool')!r}.")
        cap = spec.get("max_memory_per_child")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int)):
            raise LabCheckFailed(f"max_memory_per_child is a whole number of KiB; got {cap!r}.")
        if cap is not None and cap < 50 * 1024:
            raise LabCheckFailed("max_memory_per_child is in KiB and at least 51200 (50 MiB): a "
                                 "fresh child alone uses ~50 MiB.")
        per = spec.get("max_tasks_per_child")
        if per is not None and (isinstance(per, bool) or not isinstance(per, int) or per < 1):
            raise LabCheckFailed(f"max_tasks_per_child is a whole number of tasks, at least 1; "
                                 f"got {per!r}.")
    names = [spec.get("name") for spec in workers if spec.get("name")]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise LabCheckFailed(f"Two workers share the name {twice[0]!r}: a worker's name is its "
                             "identity on the broker (remote control, monitoring); give each "
                             "its own.")
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


def run_lab03_workload(stack, routes, specs) -> dict:
    """Start the workers, send the lab's workload through ``routes``, wait, stop the workers.

    Returns the lookups' latencies and p95, the finished attempts by kind, and the workers.
    """
    import time

    from celerylab.recording import percentile

    app = _lab03_producer(stack, routes)
    queue_of = _queues_of(app)
    for q in set(queue_of.values()):
        stack.redis.delete(q)
    workers = []
    taken = {spec.get("name") for spec in specs}
    defaults = iter(n for n in (f"lab03-{i}" for i in range(100)) if n not in taken)
    for spec in specs:
        cap, per = spec.get("max_memory_per_child"), spec.get("max_tasks_per_child")
        workers.append(stack.worker(
            "celerylab.workloads", name=spec.get("name") or next(defaults),
            queues=list(spec["queues"]), concurrency=int(spec["concurrency"]),
            pool=spec.get("pool", "prefork"), prefetch_multiplier=4,
            extra_args=(["--max-memory-per-child", str(cap)] if cap else [])
            + (["--max-tasks-per-child", str(per)] if per else [])))
    stack.start_workers(*workers)
    try:
        slow = [app.send_task(LAB03_TASKS["slow"], (1.0,)).id for _ in range(6)]
        hungry = [app.send_task(LAB03_TASKS["hungry"], (150,)).id for _ in range(2)]
        lookups = []
        for i in range(30):  # steady traffic while the slow and hungry work runs
            lookups.append(app.send_task(LAB03_TASKS["lookup"], (i,)).id)
            time.sleep(0.03)
        done = {a.id: a for a in stack.wait_for(slow + hungry + lookups, timeout=60)}
        hungry_pids = {done[i].pid for i in hungry}
        # each import in a child of its own (no child ran two), and every one of them replaced
        replaced = len(hungry_pids) == len(hungry)
        recycles = any(spec.get("max_memory_per_child") or spec.get("max_tasks_per_child")
                       for spec in specs)
        if replaced and recycles:  # a child is replaced just after its task: wait for it
            try:
                stack.wait_until(lambda: not any(pid_alive(p) for p in hungry_pids), 10,
                                 "the hungry children")
            except CourseError:
                replaced = False
        elif replaced:
            replaced = not any(pid_alive(p) for p in hungry_pids)
    finally:
        stack.stop_workers()
    latencies = [done[i].latency for i in lookups]
    return {"p95": percentile(latencies, 95), "latencies": latencies, "queue of": queue_of,
            "lookups": [done[i] for i in lookups], "hungry": [done[i] for i in hungry],
            "hungry replaced": replaced, "workers": workers}


def _queue_name(route: dict) -> str:
    """The queue a route delivers to: its queue, or (exchange and routing key given) the queue
    of that name, which is how Celery declares the queues a worker consumes (``-Q name``)."""
    if "queue" in route:
        return route["queue"].name
    return route.get("routing_key") or route.get("exchange") or "celery"


def _queues_of(app) -> dict:
    try:
        return {kind: _queue_name(app.amqp.router.route({}, name, (), {}))
                for kind, name in LAB03_TASKS.items()}
    except Exception as exc:
        raise LabCheckFailed(f"Celery could not apply your routes: {type(exc).__name__}: {exc}. "
                             "task_routes maps task names (or patterns) to {'queue': name}.") \
            from None


BASELINE_QUEUE = "lab03-baseline"


@checker
def check_lab03(routing_plan, stack) -> None:
    """Lab 3: routes and workers that keep lookups fast while slow and hungry work runs."""
    plan = call_learner(routing_plan, what="routing_plan")
    routes, specs = _lab03_layout(plan)
    queue_of = _queues_of(_lab03_producer(stack, routes))
    served = {q for spec in specs for q in spec["queues"]}
    for kind, queue in queue_of.items():
        if queue not in served:
            raise LabCheckFailed(f"{LAB03_TASKS[kind]} is routed to the queue {queue!r}, which no "
                                 "worker consumes: those tasks would wait forever.")
    ok(f"routes: {queue_of}; every queue has a worker")

    # The baseline, measured now on this machine: everything in one queue, the whole budget.
    baseline = run_lab03_workload(
        stack, {name: {"queue": BASELINE_QUEUE} for name in LAB03_TASKS.values()},
        [{"name": "baseline", "queues": [BASELINE_QUEUE], "concurrency": LAB03_MAX_CONCURRENCY}])
    ok(f"baseline (one queue, one worker -c {LAB03_MAX_CONCURRENCY}): lookup p95 "
       f"{baseline['p95']:.3f} s")
    fig = run_lab03_workload(stack, routes, specs)
    # Where and how the imports ran is a fact of the layout, whatever the load: judged before the
    # timing (when the imports share the lookups' queue, the timing hint below names that first).
    shares_host = bool({a.host for a in fig["hungry"]} & {a.host for a in fig["lookups"]})
    if shares_host and queue_of["hungry"] != queue_of["lookup"]:
        raise LabCheckFailed("import_catalog ran on the same worker as the lookups: every "
                             "import parks 150 MiB next to latency-sensitive work. Give it a "
                             "worker of its own.")
    in_main = {a.pid for a in fig["hungry"]} & {w.pid for w in fig["workers"]}
    if in_main and not shares_host:
        raise LabCheckFailed(
            "import_catalog ran in a worker's main process (its pool has no child processes), "
            "which keeps its 150 MiB for as long as the worker lives: nothing replaces a main "
            "process. Which pool gives the imports processes that can be replaced?")
    if not fig["hungry replaced"] and not shares_host:
        pids = [a.pid for a in fig["hungry"]]
        if len(set(pids)) < len(pids):
            raise LabCheckFailed(
                f"Both imports of import_catalog ran in one child (pid {pids[0]}): the second "
                "started in a process still holding the first one's 150 MiB. Which setting "
                "replaces a child after a task that left it too big, before it takes the next?")
        raise LabCheckFailed(
            f"The children that ran import_catalog (pids {sorted(set(pids))}) "
            "were still alive after it, each holding 150 MiB. Which worker setting replaces a "
            "child after a task that left it too big?")
    ratio = fig["p95"] / baseline["p95"]
    line = (f"your layout: lookup p95 {fig['p95']:.3f} s = {ratio:.0%} of the baseline "
            f"(target <= {LAB03_TARGET_RATIO:.0%})")
    if ratio > LAB03_TARGET_RATIO:
        lookup_hosts = {a.host for a in fig["lookups"]}
        shared = [k for k in ("slow", "hungry") if queue_of[k] == queue_of["lookup"]]
        busy = [w.hostname for w in fig["workers"] if w.hostname in lookup_hosts
                and {queue_of["slow"], queue_of["hungry"]} & set(w.queues)]
        where = (f"in the queue {queue_of['lookup']!r}, together with the "
                 f"{' and '.join(shared)} tasks" if shared else
                 f"on {', '.join(busy)}, which also serves other work" if busy else
                 f"in the queue {queue_of['lookup']!r}")
        raise LabCheckFailed(f"{line}. The lookups waited {where}. What else could they be stuck "
                             "behind, and how do you give them a line of their own?")
    ok(line)
    if shares_host:
        raise LabCheckFailed("import_catalog ran on the same worker as the lookups: every "
                             "import parks 150 MiB next to latency-sensitive work. Give it a "
                             "worker of its own.")
    ok("memory-hungry work ran apart, and its children were replaced after it")
    print("Lab 3 passed: slow and hungry work can no longer hold the fast path hostage.")
