"""Lab 2 checker: a layout of pools and concurrency that serves CPU-bound and I/O-bound work."""

from __future__ import annotations

from celerylab.checks.common import POOLS, LabCheckFailed, call_learner, checker, ok

# Sized so that the deciding factor is how many waits a layout overlaps (robust on a loaded
# 2-core machine), while CPU-bound tasks stuck behind waiting ones still miss the target.
LAB02_CPU = (8, 1_500_000)  # 8 CPU-bound tasks of ~0.08 s each
LAB02_IO = (60, 0.5)  # 60 I/O-bound tasks waiting 0.5 s each
LAB02_TARGET = 40.0  # tasks per second, first publish to last finish (a good layout: ~60)


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


@checker
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
