"""Small ipywidgets controls. Their logic is in plain functions, which the tests call directly."""

from __future__ import annotations

import functools
import json

STOPPED = ("This notebook's broker does not answer: its stack is stopped (the notebook's last "
           "cell, stack.stop(), stops it) or its Redis died. Re-run the setup cell "
           "(stack = celerylab.start(...)) and the cells that start the workers, then press again.")

# A control follows the notebook's current stack: re-running the setup cell (which replaces the
# stack) and pressing again works, without re-running the control's own cell.


def now(stack=None):
    """The stack to act on when a control is pressed: the kernel's current one (the setup cell
    may have replaced the one the control was made with), else ``stack``."""
    from celerylab import stack as stacks
    return stacks._current or stack


def now_redis(r):
    s = now()
    return s.redis if s is not None and not s.stopped else r


def now_task(task):
    from celerylab.stack import live_task
    return live_task(task)


def answers(r) -> bool:
    """Does this Redis answer right now (within a second)?"""
    import redis
    try:
        return bool(redis.Redis(connection_pool=r.connection_pool, socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def reported(out, fn, r=None):
    """Wrap a widget callback so that whatever goes wrong shows in the widget's own output area
    (not in JupyterLab's log console); with ``r``, a broker that no longer answers is reported at
    once, with the way to restart it, instead of Celery's long reconnection attempts."""

    @functools.wraps(fn)
    def run(*args):
        if r is not None and not answers(now_redis(r)):
            return show(out, STOPPED)
        try:
            from celerylab.stack import check_names
            check_names(_globals_read(fn), then="press again")
            return fn(*args)
        except Exception as exc:
            from celerylab.errors import CourseError
            show(out, str(exc) if isinstance(exc, CourseError) else f"{type(exc).__name__}: {exc}")
    return run


def show(out, text: str) -> None:
    """Replace what ``out`` shows with ``text``. In a kernel, through the output's context, as
    the callbacks write: the browser applies the clear and the text in order. (Mixing in
    ``out.append_stdout``, a state sent from the kernel, raced the browser's own copy of the
    cleared output: under load a control was left empty.)"""
    out.clear_output()
    if _in_kernel():
        with out:
            print(text)
    else:  # plain Python (a script, the unit tests): no browser, the state is the output
        out.append_stdout(text + "\n")


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


def _globals_read(fn) -> set[str]:
    """The global names ``fn`` (and the functions it closes over, such as a notebook's request
    handlers) read: one bound to a task module of an earlier stack is named to the learner."""
    names, seen, todo = set(), set(), [fn]
    while todo:
        f = todo.pop()
        code = getattr(f, "__code__", None)
        if code is None or id(f) in seen:
            continue
        seen.add(id(f))
        names |= set(code.co_names)
        for cell in getattr(f, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if callable(value):
                todo.append(value)
            elif isinstance(value, dict):
                todo.extend(v for v in value.values() if callable(v))
    return names


def send_and_inspect(task, r, n: int, queue: str = "celery") -> dict:
    """Publish ``n`` messages of ``task`` (args ``(i, i)``) to ``queue``; report what Redis holds."""
    ids = [task.apply_async((i, i), queue=queue).id for i in range(n)]
    newest = r.lindex(queue, 0)
    oldest = r.lindex(queue, -1)
    return {"sent": len(ids), "depth": r.llen(queue),
            "oldest id": json.loads(oldest)["headers"]["id"] if oldest else None,
            "newest id": json.loads(newest)["headers"]["id"] if newest else None,
            "ids": ids}


def purge(r, queue: str = "celery") -> int:
    """Delete a queue's list (only messages of this notebook's broker); return how many it held."""
    depth = r.llen(queue)
    r.delete(queue)
    return depth


def queue_explorer(task, r, queue: str = "celery"):
    """A slider and two buttons: send N messages (no worker consumes them) or purge the queue."""
    import ipywidgets as w

    count = w.IntSlider(value=5, min=1, max=50, description="messages")
    send, empty = w.Button(description="send"), w.Button(description="purge queue")
    out = w.Output()

    def on_send(_):
        report = send_and_inspect(now_task(task), now_redis(r), count.value, queue)
        show(out, f"sent {report['sent']}; LLEN {queue} = {report['depth']}\n"
             f"next out (right end, LINDEX -1): {report['oldest id']}\n"
             f"last in  (left end,  LINDEX 0):  {report['newest id']}")

    send.on_click(reported(out, on_send, r))
    empty.on_click(reported(out, lambda _: show(
        out, f"deleted {purge(now_redis(r), queue)} messages from {queue!r}"), r))
    return w.VBox([w.HBox([count, send, empty]), out])


def time_handler(handler, n: int) -> dict:
    """Call ``handler(i)`` for i in range(n), timing each call: the handler's own latency."""
    import statistics
    import time
    latencies = []
    for i in range(n):
        t0 = time.perf_counter()
        handler(i)
        latencies.append(time.perf_counter() - t0)
    return {"requests": n, "median ms": statistics.median(latencies) * 1000,
            "max ms": max(latencies) * 1000}


def handler_timer(handlers: dict, r=None):
    """Pick a request handler, press the button: n requests, their median latency printed."""
    import ipywidgets as w

    which = w.ToggleButtons(options=list(handlers), description="handler")
    count = w.IntSlider(value=5, min=1, max=20, description="requests")
    go = w.Button(description="handle requests", layout=w.Layout(width="auto"))
    out = w.Output()

    def on_go(_):
        got = time_handler(handlers[which.value], count.value)
        out.clear_output()
        with out:
            print(f"{which.value}: {got['requests']} requests, median {got['median ms']:.2f} ms, "
                  f"slowest {got['max ms']:.2f} ms")

    go.on_click(reported(out, on_go, r))
    return w.VBox([which, w.HBox([count, go]), out])


def latency_experiment(stack, fast_task, slow_task, *, fast_queue: str, slow_queue: str,
                       n_fast: int = 20, n_slow: int = 6, slow_seconds: float = 1.0,
                       timeout: float = 60) -> dict:
    """Send ``n_slow`` slow tasks, then ``n_fast`` fast ones, to the queues given (overriding any
    route); wait for all; return the fast tasks' latencies (sent to finished) with p50 and p95."""
    from celerylab.recording import percentile
    slow = [slow_task.apply_async((slow_seconds,), queue=slow_queue).id for _ in range(n_slow)]
    fast = [fast_task.apply_async((i,), queue=fast_queue).id for i in range(n_fast)]
    done = stack.wait_for(slow + fast, timeout=timeout)
    latencies = [a.latency for a in done if a.id in set(fast)]
    return {"fast queue": fast_queue, "slow queue": slow_queue, "latencies": latencies,
            "p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
            "attempts": done}


def routing_explorer(stack, fast_task, slow_task, queues: list[str]):
    """Pick the queue of the fast and of the slow tasks, run the experiment, see the latencies."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from celerylab import plots

    fast_q = w.Dropdown(options=queues, value=queues[0], description="fast tasks ->")
    slow_q = w.Dropdown(options=queues, value=queues[-1], description="slow tasks ->")
    run = w.Button(description="run experiment")
    out = w.Output()
    history: dict[str, list[float]] = {}

    def on_run(_):
        out.clear_output()
        with out:
            print("running ...")
            res = latency_experiment(now(stack), now_task(fast_task), now_task(slow_task),
                                     fast_queue=fast_q.value, slow_queue=slow_q.value)
            history[f"fast:{fast_q.value}\nslow:{slow_q.value}"] = res["latencies"]
            out.clear_output()
            print(f"fast tasks p50 {res['p50']:.3f} s, p95 {res['p95']:.3f} s")
            plots.latency_distributions(history, "Fast-task latency by layout", log=True)
            plt.show()

    run.on_click(reported(out, on_run, stack.redis))
    return w.VBox([w.HBox([fast_q, slow_q, run]), out])


def prefetch_explorer(stack, *, app: str, task: str, late_task: str):
    """Pick prefetch settings and a workload mix; run them beside the default; see timelines,
    makespan and short-task p95 (logic: ``celerylab.prefetch.compare_with_default``)."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from celerylab import plots, prefetch

    multiplier = w.Dropdown(options=[1, 2, 4, 16], value=1, description="multiplier")
    late = w.Checkbox(value=True, description="acks_late")
    disable = w.Checkbox(value=False, description="--disable-prefetch")
    concurrency = w.IntSlider(value=2, min=1, max=4, description="-c (each)")
    n_long = w.IntSlider(value=3, min=0, max=8, description="long tasks")
    n_short = w.IntSlider(value=10, min=1, max=30, description="short tasks")
    run = w.Button(description="run beside the default", layout=w.Layout(width="auto"))
    out = w.Output()

    def on_run(_):
        out.clear_output()
        with out:
            print("booting four workers and running ...")
            setting = {"prefetch_multiplier": multiplier.value, "acks_late": late.value,
                       "disable_prefetch": disable.value, "concurrency": concurrency.value}
            runs = prefetch.compare_with_default(
                now(stack), setting, app=app, task=task, late_task=late_task,
                n_long=n_long.value, n_short=max(n_short.value, 1))
            out.clear_output()
            print(plots.table([{"run": f"{label}: {prefetch.describe(m['setting'])}",
                                "makespan s": m["makespan"], "x default": m["makespan ratio"],
                                "short p95 s": m["short p95"], "p95 x default": m["p95 ratio"],
                                "most waiting in one reserve": max(m["reserve peaks"].values())}
                               for label, m in runs.items()]))
            longs = {a.id for m in runs.values() for a in m["attempts"] if a.runtime > 0.6}
            plots.timelines({f"{label}: {prefetch.describe(m['setting'])}": m["attempts"]
                             for label, m in runs.items()}, "Two workers sharing a queue",
                            highlight={a.id for m in runs.values() for a in m["attempts"]} - longs)
            plt.show()

    run.on_click(reported(out, on_run, stack.redis))
    return w.VBox([w.HBox([multiplier, late, disable]), w.HBox([concurrency, n_long, n_short]),
                   w.HBox([run]), out])
