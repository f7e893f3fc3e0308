"""Lab 2 checker: a layout of pools and concurrency that serves CPU-bound and I/O-bound work."""

from __future__ import annotations

from celerylab.checks.common import (
    POOLS,
    LabCheckFailed,
    MachineTooBusy,
    call_learner,
    checker,
    ok,
)

# Each kind of work is judged against a reference measured in the same check, never against an
# absolute tasks/s: CPU-bound tasks against the same burns run by one and by two plain processes
# right now; I/O-bound tasks in "waves", their span over what one of them takes.
LAB02_CPU = (8, 4_500_000)  # 8 CPU-bound tasks (together one or two seconds of CPU on a laptop)
LAB02_IO = (60, 0.5)  # 60 I/O-bound tasks waiting 0.5 s each
LAB02_MAX_WAVES = 5  # the I/O tasks finish within 5x the time one takes: their waits overlap
LAB02_GIVE_UP_WAVES = 12  # stop a layout whose I/O tasks are still running after 12x one's time
LAB02_CPU_GRACE = 30.0  # s more for the CPU-bound tasks once the I/O-bound ones are done (load)
LAB02_MIN_PARALLELISM = 1.6  # below this the machine cannot show two cores at work right now


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
        queues = spec["queues"]
        if not isinstance(queues, (list, tuple)) or not all(isinstance(q, str) for q in queues):
            raise LabCheckFailed(f"A worker's 'queues' is a list of queue names; got {queues!r}.")
        concurrency = spec["concurrency"]
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or \
                not 1 <= concurrency <= 32:
            raise LabCheckFailed("concurrency must be a whole number from 1 to 32.")
    served = {q for spec in layout for q in spec["queues"]}
    for queue in ("cpu", "io"):
        if queue not in served:
            raise LabCheckFailed(f"No worker consumes the queue {queue!r}: its tasks would wait "
                                 "forever.")
    return list(layout)


def run_lab02_workload(stack, layout) -> dict:
    """Start the layout's workers, run the lab's workload on them, stop them; report figures.

    ``cpu seconds``: first start to last finish of the CPU-bound tasks. ``io waves``: the span of
    the I/O-bound tasks over the median time one of them ran (1 wave = all waited at once).
    """
    import time

    from celerylab.recording import percentile, processes_at_once

    layout = _validate_layout(layout)
    for queue in ("cpu", "io"):
        stack.redis.delete(queue)
    workers = [stack.worker("celerylab.workloads", name=f"lab02-{i}", pool=spec["pool"],
                            concurrency=spec["concurrency"], queues=list(spec["queues"]),
                            prefetch_multiplier=1)
               for i, spec in enumerate(layout)]
    stack.start_workers(*workers)
    (n_cpu, size), (n_io, wait) = LAB02_CPU, LAB02_IO
    done: list = []
    try:
        send = stack.control.send_task  # by name: the task code lives in celerylab.workloads
        # Both kinds at once, as in production: a layout must serve each while the other runs.
        cpu = [send("celerylab.workloads.crunch", (size,), queue="cpu").id for _ in range(n_cpu)]
        io = [send("celerylab.workloads.wait_io", (wait,), queue="io").id for _ in range(n_io)]
        while True:  # until every task is done, or the I/O tasks have taken too many waves
            done = [a for a in stack.records(cpu + io) if a.state == "SUCCESS"]
            io_done = [a for a in done if a.id in set(io)]
            if len(done) == n_cpu + n_io:
                break
            first = min((a.sent for a in stack.records(io) if a.sent), default=time.time())
            unit = percentile([a.runtime for a in io_done], 50) if io_done else wait
            late = time.time() - first - LAB02_GIVE_UP_WAVES * unit - 5 * (not io_done)
            # the I/O tasks decide when to give up; CPU work on a loaded machine gets longer
            if late > 0 and (len(io_done) < n_io or late > LAB02_CPU_GRACE):
                break
            time.sleep(0.05)
    finally:
        if len(done) < n_cpu + n_io:
            for w in workers:
                w.kill()  # tasks are still running: no point in a warm shutdown
        stack.stop_workers()

    def figures(ids):
        ids = set(ids)
        mine = [a for a in done if a.id in ids]
        if len(mine) < len(ids):
            return None, None
        return (max(a.finished for a in mine) - min(a.started for a in mine),
                percentile([a.runtime for a in mine], 50))

    cpu_span, _ = figures(cpu)
    cpu_runs = [a for a in done if a.id in set(cpu)]
    io_span, io_unit = figures(io)
    sent = [a.sent for a in stack.records(cpu + io) if a.sent]
    elapsed = max((a.finished for a in done), default=0) - min(sent, default=0)  # both phases
    return {"finished": len(done), "total": n_cpu + n_io, "seconds": elapsed,
            "tasks/s": len(done) / elapsed if elapsed > 0 else 0.0,
            "cpu seconds": cpu_span, "io seconds": io_span,
            "io waves": io_span / io_unit if io_span else None,
            "io finished": sum(a.id in set(io) for a in done),
            "io tasks at once": processes_at_once([a for a in done if a.id in set(io)],
                                                  per="task"),
            "cpu processes at once": processes_at_once(cpu_runs),
            "cpu tasks at once in one process": max(
                (processes_at_once([a for a in cpu_runs if a.pid == pid], per="task")
                 for pid in {a.pid for a in cpu_runs}), default=0)}



def cpu_reference() -> dict:
    """The lab's CPU-bound work burnt by one plain process, then by two, right now."""
    from celerylab.reference import cpu_parallelism
    n_cpu, size = LAB02_CPU
    return cpu_parallelism(n=size, rounds=n_cpu)


@checker
def check_lab02(choose_layout, stack) -> None:
    """Lab 2: each kind of work served as well as this machine allows, measured side by side."""
    layout = call_learner(choose_layout, what="choose_layout")
    _validate_layout(layout)
    ok(f"layout: {layout}")
    n_cpu, n_io = LAB02_CPU[0], LAB02_IO[0]
    ref = cpu_reference()  # the reference, measured right before the layout runs
    fig = run_lab02_workload(stack, layout)
    print(f"  measured: {fig['finished']}/{fig['total']} tasks, {fig['tasks/s']:.1f} tasks/s "
          "(for information: the verdicts below are relative)")

    # CPU-bound, what shows on any machine: the tasks ran in separate processes, at least two at
    # the same moment, and no process ran two of them at once (threads share one interpreter lock).
    at_once, crowded = fig["cpu processes at once"], fig["cpu tasks at once in one process"]
    cpu_wrong = at_once < 2 or crowded > 1

    def cpu_failed():
        took = ("did not all finish" if fig["cpu seconds"] is None
                else f"never ran in two processes at the same moment (at most {at_once})"
                if at_once < 2 else
                f"ran {crowded} at once inside one process, taking turns on its interpreter lock")
        return LabCheckFailed(
            f"The {n_cpu} CPU-bound tasks {took}. Pure-Python work holds the interpreter's lock: "
            "which pool runs tasks in separate processes, and how many do you need for the "
            "cores here?")

    # A CPU worker of its own is judged first: how it ran is a fact of its pool, whatever the
    # load, while the I/O timing (judged next) stretches on a busy machine.
    shared = any({"cpu", "io"} <= set(w["queues"]) for w in layout)
    # facts only: a CPU task crowded into one process, or all of them finished never two at once
    if not shared and (crowded > 1 or fig["cpu seconds"] is not None and at_once < 2):
        raise cpu_failed()

    # I/O-bound: in waves of the time one task takes, whatever the machine's speed.
    # The layout's own room for waits at once (solo runs one): when it, or what was seen running
    # at once, would finish a wave or more within the target, a slower finish is the machine's
    # load (a busy machine starts the I/O tasks late), not the answer.
    overlapped = fig["io tasks at once"]
    room = sum(1 if w["pool"] == "solo" else w["concurrency"] for w in layout if "io" in w["queues"])
    if fig["io waves"] is not None and fig["io waves"] > LAB02_MAX_WAVES and not shared and \
            -(-n_io // max(overlapped, room, 1)) <= LAB02_MAX_WAVES - 1:
        raise MachineTooBusy(f"the {n_io} I/O-bound tasks ran on a worker of their own with room "
                             f"for {room} at once (up to {overlapped} ran at once), enough to "
                             f"finish well within {LAB02_MAX_WAVES} waves, "
                             f"yet took {fig['io waves']:.1f} times as long as one of them.")
    if fig["io waves"] is None or fig["io waves"] > LAB02_MAX_WAVES:
        took = (f"only {fig['io finished']} of {n_io} had finished after "
                f"{LAB02_GIVE_UP_WAVES} times the time one takes" if fig["io waves"] is None
                else f"took {fig['io waves']:.1f} times as long as one of them")
        raise LabCheckFailed(
            f"The {n_io} I/O-bound tasks {took}; the target is {LAB02_MAX_WAVES} times. Each one "
            "mostly waits. How many waits can your layout overlap at once?")
    ok(f"I/O-bound: all {n_io} done in {fig['io waves']:.1f} x the time one takes "
       f"(target <= {LAB02_MAX_WAVES})")

    if fig["cpu seconds"] is None and not cpu_wrong:
        raise MachineTooBusy(f"the {n_cpu} CPU-bound tasks ran in separate processes, two or more "
                             f"at once, but had not all finished {LAB02_CPU_GRACE:.0f} s after "
                             "the I/O-bound ones.")
    if cpu_wrong:
        raise cpu_failed()
    ok(f"CPU-bound: the tasks ran in {at_once} processes at the same moment, one task each")

    # CPU-bound, the speed-up, shown against one and two plain processes burning the same work
    # right now. Shown, not judged: within this lab's choices the processes above decide it, and
    # under load the kernel can keep two pool children on one core for a while (measured here:
    # no speed-up at all while two fresh plain processes got 1.4-1.7x), which is not the answer's
    # doing.
    line = (f"{n_cpu} CPU-bound tasks took {fig['cpu seconds']:.2f} s; the same burns right now: "
            f"one process {ref['serial s']:.2f} s, two processes {ref['parallel s']:.2f} s")
    if fig["cpu seconds"] <= (ref["serial s"] + ref["parallel s"]) / 2:
        ok(line + " (closer to two)")
    elif ref["parallelism"] < LAB02_MIN_PARALLELISM:
        print(f"  --  {line}: two plain processes got only {ref['parallelism']:.2f}x the work of "
              "one done, so the machine is too busy to show a speed-up right now. Judged on the "
              "processes above; run the check again when the machine is quieter to see it.")
    else:
        print(f"  --  {line}: no speed-up this time although your tasks ran in {at_once} "
              "processes at once; the machine's load changed, or the kernel kept your processes "
              "on one core for a while. Judged on the processes above; run the check again to "
              "see the speed-up.")
    print("Lab 2 passed: each kind of work runs the way it should.")
