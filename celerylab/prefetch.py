"""Prefetch experiments on the live stack (chapter 6, lab 6): start, send, record, summarise.

The Celery settings under test are the arguments: each becomes a worker flag
(``--prefetch-multiplier``, ``--concurrency``, ``--disable-prefetch``) or the choice between a task
declared with ``acks_late=True`` and one without. Nothing is simulated: real workers, real sleeps,
timings from the recording.
"""

from __future__ import annotations

import json
import time
from types import MappingProxyType

from celerylab.recording import percentile

# Celery's defaults (read-only: a notebook that edits "the defaults" in place must not change what
# later experiments and lab 6's reference run)
DEFAULT = MappingProxyType({"prefetch_multiplier": 4, "acks_late": False,
                            "disable_prefetch": False, "concurrency": 2})


def describe(setting: dict) -> str:
    """A short label: "multiplier 4, early ack, -c 2" (and ", prefetch disabled")."""
    s = {**DEFAULT, **setting}
    return (f"multiplier {s['prefetch_multiplier']}, "
            f"{'acks_late' if s['acks_late'] else 'early ack'}, -c {s['concurrency']}"
            + (", prefetch disabled" if s["disable_prefetch"] else ""))


def workers_for(stack, app: str, setting: dict, *, queue: str, names, cwd=None) -> list:
    """Workers (not started) sharing ``queue``, one per name, with the setting's flags."""
    s = {**DEFAULT, **setting}
    return [stack.worker(app, name=name, queues=[queue], concurrency=int(s["concurrency"]),
                         prefetch_multiplier=int(s["prefetch_multiplier"]),
                         extra_args=["--disable-prefetch"] if s["disable_prefetch"] else [],
                         cwd=cwd) for name in names]


def reserve_peaks(attempts) -> dict[str, int]:
    """Per worker: the most messages it held received but not started at one moment (its
    reserve; what ``inspect().reserved()`` would have listed)."""
    peaks: dict[str, int] = {}
    for host in {a.host for a in attempts if a.host}:
        mine = [a for a in attempts if a.host == host and a.received and a.started]
        edges = sorted([(a.received, 1) for a in mine] + [(a.started, -1) for a in mine],
                       key=lambda e: (e[0], e[1]))
        now = best = 0
        for _, step in edges:
            now += step
            best = max(best, now)
        peaks[host] = best
    return peaks


def running_peak(attempts) -> int:
    """The most tasks running at one moment, over all workers."""
    edges = sorted([(a.started, 1) for a in attempts] + [(a.finished, -1) for a in attempts],
                   key=lambda e: (e[0], e[1]))
    now = best = 0
    for _, step in edges:
        now += step
        best = max(best, now)
    return best


def summarise(attempts, short_ids) -> dict:
    """Makespan (first sent to last finished), the short tasks' latencies and p95, and where the
    short tasks waited: in Redis (sent to received) or in a worker's reserve (received to started)."""
    short_ids = set(short_ids)
    shorts = [a for a in attempts if a.id in short_ids]
    latencies = [a.latency for a in shorts]
    return {"attempts": attempts,
            "makespan": max(a.finished for a in attempts) - min(a.sent for a in attempts),
            "short latencies": latencies,
            "short p95": percentile(latencies, 95),
            "short wait in Redis": max(a.received - a.sent for a in shorts),
            "short wait in a reserve": max(a.started - a.received for a in shorts),
            "reserve peaks": reserve_peaks(attempts),
            "running peak": running_peak(attempts),
            "tasks per worker": {h: sum(1 for a in attempts if a.host == h)
                                 for h in sorted({a.host for a in attempts})}}


def run_mixed(stack, settings: dict[str, dict], *, app: str, task: str, late_task: str,
              n_long: int = 3, long_seconds: float = 1.2, n_short: int = 10,
              short_seconds: float = 0.05, workers: int = 2, prefix: str = "mix", cwd=None,
              timeout: float = 60) -> dict[str, dict]:
    """For each setting, ``workers`` workers sharing one queue of their own; all boot at once.
    Each queue gets ``n_long`` long tasks, then ``n_short`` short ones (``late_task`` when the
    setting has ``acks_late``); the settings run side by side, under the same load. Returns
    ``summarise()`` per label, plus the setting and its workers. The workers are stopped."""
    plan = []
    for i, (label, setting) in enumerate(settings.items()):
        queue = f"{prefix}-{i}"
        stack.redis.delete(queue)
        names = [f"{prefix}{i}{chr(ord('a') + k)}" for k in range(workers)]
        plan.append((label, {**DEFAULT, **setting}, queue,
                     workers_for(stack, app, setting, queue=queue, names=names, cwd=cwd)))
    stack.start_workers(*[w for *_, ws in plan for w in ws])
    try:
        sent = {}
        for label, setting, queue, _ in plan:
            name = late_task if setting["acks_late"] else task
            longs = [stack.control.send_task(name, (long_seconds,), queue=queue).id
                     for _ in range(n_long)]
            shorts = [stack.control.send_task(name, (short_seconds,), queue=queue).id
                      for _ in range(n_short)]
            sent[label] = (longs, shorts)
        results = {}
        for label, setting, _queue, ws in plan:
            longs, shorts = sent[label]
            done = stack.wait_for(longs + shorts, timeout=timeout)
            results[label] = {**summarise(done, shorts), "setting": setting, "workers": ws}
    finally:
        stack.stop_workers()
    return results


def held_now(stack, workers, queues) -> list[dict]:
    """What each busy worker holds right now, from Celery's remote control and from Redis:
    ``prefetch_count`` (``inspect().stats()``), ``active()``, ``reserved()``, ``scheduled()``,
    this worker's entries in the ``unacked`` hash, and what is still waiting in its queue."""
    hosts = [w.hostname for w in workers]
    ins = stack.control.control.inspect(hosts, timeout=3)
    stats, active, reserved, scheduled = ins.stats(), ins.active(), ins.reserved(), ins.scheduled()
    unacked: dict[str, int] = {}
    for raw in stack.redis.hvals("unacked"):  # each value: [message, exchange, routing key]
        routing_key = json.loads(raw)[2]
        unacked[routing_key] = unacked.get(routing_key, 0) + 1
    rows = []
    for w, q in zip(workers, queues, strict=True):
        h = w.hostname
        rows.append({"worker": h, "prefetch_count": stats[h]["prefetch_count"],
                     "active": len(active[h]), "reserved": len(reserved[h]),
                     "scheduled": len(scheduled[h]), "HLEN unacked (its queue)": unacked.get(q, 0),
                     "LLEN (still in Redis)": stack.redis.llen(q)})
    return rows


def drain_rates(stack, jobs: dict, together: bool = False, timeout: float = 60) -> dict:
    """Consumption rates, with the publishing kept out of the measurement.

    ``jobs``: {label: (task name, queue, n, args)}. Each job's ``n`` messages are published first
    to a side list nobody consumes, then ``RENAME``d into its queue (atomic): its worker finds them
    all waiting at once. ``together``: release every queue at the same moment (the workers drain
    side by side); otherwise one after the other. Per label: tasks/s from the first received to
    the last finished, publish/s, the ids and the attempts."""
    staged = {}
    for label, (task_name, queue, n, args) in jobs.items():
        staging = f"{queue}-staging"
        stack.redis.delete(staging, queue)
        t0 = time.perf_counter()
        ids = [stack.control.send_task(task_name, args, queue=staging).id for _ in range(n)]
        staged[label] = (queue, staging, ids, n / (time.perf_counter() - t0))

    def release(labels):
        for label in labels:
            queue, staging, *_ = staged[label]
            stack.redis.rename(staging, queue)
        for label in labels:  # a cheap poll while they drain, then the recording, once
            stack.wait_until(lambda q=staged[label][0]: stack.redis.llen(q) == 0, timeout,
                             f"{label} to drain")
        return {label: stack.wait_for(staged[label][2], timeout=timeout) for label in labels}

    done = release(list(jobs)) if together else {
        label: release([label])[label] for label in jobs}
    out = {}
    for label, attempts in done.items():
        span = max(a.finished for a in attempts) - min(a.received for a in attempts)
        out[label] = {"tasks/s": len(attempts) / span, "publish/s": staged[label][3],
                      "ids": staged[label][2], "attempts": attempts}
    return out


def wait_steady(stack, probe, steady: float = 0.3, timeout: float = 10.0, what: str = "it"):
    """Poll ``probe()`` until it returns the same value for ``steady`` seconds; return it.
    (Workers fetch in bursts: this waits for what they hold to stop changing.)"""
    seen = {"value": object(), "since": time.monotonic()}

    def settled():
        value = probe()
        if value != seen["value"]:
            seen.update(value=value, since=time.monotonic())
            return False
        return time.monotonic() - seen["since"] >= steady

    stack.wait_until(settled, timeout, f"{what} to settle")
    return seen["value"]


def raw_redis_rates(r, n: int = 2000, size: int = 400) -> dict:
    """The broker's own floor, measured: ``n`` LPUSH then ``n`` BRPOP of ``size``-byte values,
    one round trip each, on a key of their own. Kombu's Redis transport makes three per message
    it delivers: the BRPOP, a ZADD+HSET transaction (MULTI/EXEC, one round trip) into
    ``unacked``/``unacked_index`` on delivery, and a ZREM+HDEL one on ack (``kombu/transport/redis.py``: ``QoS.append``, ``QoS.ack``);
    the raw BRPOP rate is an upper bound, not kombu's rate."""
    key = "celerylab:raw-ops"
    r.delete(key)
    value = b"x" * size
    t0 = time.perf_counter()
    for _ in range(n):
        r.lpush(key, value)
    t1 = time.perf_counter()
    for _ in range(n):
        r.brpop([key], timeout=1)
    t2 = time.perf_counter()
    r.delete(key)
    return {"LPUSH/s": n / (t1 - t0), "BRPOP/s": n / (t2 - t1)}


def sample_pool(worker, seconds: float, every: float = 0.05, until=None) -> list[tuple]:
    """(seconds since start, pool children) every ``every`` s for ``seconds`` (or until
    ``until(samples)`` is true), counted from the OS (the worker's child processes)."""
    t0 = time.monotonic()
    samples = []
    while time.monotonic() - t0 < seconds:
        samples.append((time.monotonic() - t0, len(worker.children())))
        if until is not None and until(samples):
            break
        time.sleep(every)
    return samples


def compare_with_default(stack, setting: dict, *, app: str, task: str, late_task: str,
                         n_long: int = 3, long_seconds: float = 1.2, n_short: int = 10,
                         short_seconds: float = 0.05, prefix: str = "cmp", cwd=None,
                         default: dict | None = None) -> dict:
    """``setting`` and ``default`` (Celery's: multiplier 4, early ack; unless given, with the same
    concurrency as ``setting``) side by side on the mixed workload, each with its ratios to the
    default. (The chapter's widget; lab 6 passes a fixed default.)"""
    if default is None:
        default = {**DEFAULT, "concurrency": setting.get("concurrency", DEFAULT["concurrency"])}
    runs = run_mixed(stack, {"default": default, "yours": setting}, app=app, task=task,
                     late_task=late_task, n_long=n_long, long_seconds=long_seconds,
                     n_short=n_short, short_seconds=short_seconds, prefix=prefix, cwd=cwd)
    for m in runs.values():
        m["makespan ratio"] = m["makespan"] / runs["default"]["makespan"]
        m["p95 ratio"] = m["short p95"] / runs["default"]["short p95"]
    return runs
