"""Lab 3 checker: routes and workers that keep the fast path fast."""

from __future__ import annotations

from celerylab.checks.common import POOLS, LabCheckFailed, call_learner, checker, ok
from celerylab.errors import CourseError
from celerylab.processes import pid_alive

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


@checker
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
