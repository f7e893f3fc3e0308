"""Recording task lifecycles from Celery's own signals, into the notebook's Redis.

Imported by the producer (the kernel) and by every worker the course starts (``-I
celerylab.recording``). Each signal appends one JSON event to the list ``celerylab:events``:

    sent      before_task_publish, in the process that publishes (kernel, or a worker retrying)
    received  task_received, in the worker's main process (the message left the broker)
    started   task_prerun, in the pool child that runs it (its pid)
    finished  task_postrun, with the final state

``worker_ready`` pushes to ``celerylab:ready:<hostname>``: readiness is a signal, not a sleep.
Times are ``time.time()`` from one machine's clock, so they compare across processes.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field

import redis
from celery import signals

EVENTS = "celerylab:events"
READY = "celerylab:ready:"
SENT_HEADER = "celerylab_sent_at"

_client: tuple[tuple[int, str], redis.Redis] | None = None


def _redis() -> redis.Redis | None:
    """A client for the current broker: one per process (after fork) and per URL (a kernel may
    start a new stack, on a new Redis, at any time)."""
    global _client
    url = os.environ.get("CELERYLAB_BROKER_URL")
    if not url:
        return None
    if _client is None or _client[0] != (os.getpid(), url):
        _client = ((os.getpid(), url), redis.Redis.from_url(url, socket_timeout=5))
    return _client[1]


def _hostname() -> str:
    return os.environ.get("CELERYLAB_WORKER_HOSTNAME") or f"kernel@{socket.gethostname()}"


def _emit(event: str, task_id: str, t: float | None = None, **fields) -> None:
    client = _redis()
    if client is None or not task_id:
        return
    record = {"event": event, "id": task_id, "t": t or time.time(), "pid": os.getpid(),
              "host": _hostname(), **fields}
    try:
        client.rpush(EVENTS, json.dumps(record, default=str))
    except redis.RedisError:
        pass  # recording must never break a task


@signals.before_task_publish.connect
def _sent(headers=None, routing_key=None, **_):
    """Stamp the message and record it *before* it is published: a worker can receive it (and
    finish it) before an ``after_task_publish`` handler would have run."""
    if headers is None:
        return
    headers[SENT_HEADER] = now = time.time()  # a retry re-publishes: stamp every message anew
    _emit("sent", headers.get("id"), t=now, name=headers.get("task"), queue=routing_key,
          retries=headers.get("retries", 0), eta=headers.get("eta"))


@signals.task_received.connect
def _received(request=None, **_):
    info = request.delivery_info or {}
    _emit("received", request.id, name=request.name, queue=info.get("routing_key"),
          redelivered=bool(info.get("redelivered")))


@signals.task_prerun.connect
def _started(task_id=None, task=None, **_):
    req = task.request
    info = req.delivery_info or {}
    _emit("started", task_id, name=task.name, retries=req.retries or 0,
          redelivered=bool(info.get("redelivered")))


@signals.task_postrun.connect
def _finished(task_id=None, task=None, state=None, **_):
    _emit("finished", task_id, name=task.name, state=state)


@signals.task_failure.connect
def _lost(task_id=None, exception=None, sender=None, **_):
    """A pool child died mid-task (WorkerLostError) and the task failed for good: the worker's
    main process reports it; no ``task_postrun`` ran in the dead child. Not sent when the message
    is requeued (``reject_on_worker_lost``) or retried (``retry_on_worker_lost``)."""
    if type(exception).__name__ == "WorkerLostError":
        _emit("lost", task_id, name=getattr(sender, "name", ""))


@signals.worker_ready.connect
def _ready(sender=None, **_):
    client = _redis()
    if client is not None:
        client.rpush(READY + _hostname(), json.dumps({"pid": os.getpid(), "t": time.time()}))


@dataclass
class Attempt:
    """One delivery of one task: from publish (or redelivery) to finish."""

    id: str
    name: str = ""
    queue: str | None = None
    sent: float | None = None
    received: float | None = None
    started: float | None = None
    finished: float | None = None
    host: str | None = None
    pid: int | None = None
    state: str | None = None
    retries: int = 0
    redelivered: bool = False
    events: list = field(default_factory=list, repr=False)

    @property
    def wait(self) -> float | None:
        """Seconds from publish to start: time spent in the broker and in the worker's reserve."""
        return None if self.sent is None or self.started is None else self.started - self.sent

    @property
    def runtime(self) -> float | None:
        return None if self.started is None or self.finished is None else self.finished - self.started

    @property
    def latency(self) -> float | None:
        """Seconds from publish to finish, what a caller waiting for the result experiences."""
        return None if self.sent is None or self.finished is None else self.finished - self.sent


def read_events(client: redis.Redis) -> list[dict]:
    return sorted((json.loads(raw) for raw in client.lrange(EVENTS, 0, -1)), key=lambda e: e["t"])


def attempts(client: redis.Redis, ids=None) -> list[Attempt]:
    """Group recorded events into attempts, in order of first appearance.

    A ``sent`` event opens a new attempt (a retry is a new message); a ``received`` with no attempt
    waiting for it is a redelivery, and opens one too. ``started`` and ``finished`` belong to the
    latest attempt still waiting for them (a ``finished`` first to the one its process started):
    a retry's ``sent`` is recorded *before* the attempt that publishes it finishes.
    """
    wanted = set(ids) if ids is not None else None
    per_task: dict[str, list[Attempt]] = {}
    out: list[Attempt] = []

    def latest(runs, test):
        return next((a for a in reversed(runs) if test(a)), None)

    for e in read_events(client):
        tid = e["id"]
        if wanted is not None and tid not in wanted:
            continue
        runs = per_task.setdefault(tid, [])
        kind = e["event"]
        if kind == "sent":
            a = None
        elif kind == "received":
            a = next((x for x in runs if x.received is None and x.started is None), None)
        elif kind == "started":
            a = latest(runs, lambda x: x.started is None)
        elif kind == "lost":
            a = latest(runs, lambda x: x.started is not None and x.finished is None
                       and x.state is None)
        else:
            # the attempt this process started (two copies of one task can run at once: a
            # redelivery past the visibility timeout), else the latest still running
            me = (e.get("pid"), e.get("host"))
            a = latest(runs, lambda x, me=me: x.started is not None and x.finished is None
                       and (x.pid, x.host) == me) or \
                latest(runs, lambda x: x.started is not None and x.finished is None) or \
                latest(runs, lambda x: x.finished is None)
        if a is None:
            a = Attempt(id=tid, name=e.get("name") or "", retries=e.get("retries", 0))
            runs.append(a)
            out.append(a)
        a.events.append(e)
        a.name = e.get("name") or a.name
        if kind == "sent":
            a.sent, a.queue = e["t"], e.get("queue")
        elif kind == "received":
            a.received, a.host = e["t"], e["host"]
            a.queue = a.queue or e.get("queue")
            a.redelivered = e.get("redelivered", False)
        elif kind == "started":
            a.started, a.pid, a.host = e["t"], e["pid"], e["host"]
            a.retries = e.get("retries", a.retries)
            a.redelivered = a.redelivered or e.get("redelivered", False)
        elif kind == "finished":
            a.finished, a.state = e["t"], e.get("state")
        elif kind == "lost":
            a.state = "LOST"  # its process died: no finish time
    return out


def percentile(values, q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; no numpy needed."""
    data = sorted(v for v in values if v is not None)
    if not data:
        raise ValueError("no values to take a percentile of")
    k = (len(data) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def processes_at_once(runs, per: str = "process") -> int:
    """The most distinct processes (``per="task"``: tasks) running one of ``runs`` at one moment."""
    edges = sorted([(a.started, 1, a.pid, a.id) for a in runs] +
                   [(a.finished, -1, a.pid, a.id) for a in runs],
                   key=lambda e: (e[0], e[1]))  # at equal times, a finish comes before a start
    running: dict = {}
    best = 0
    for _, step, pid, task in edges:
        key = pid if per == "process" else (pid, task)
        running[key] = running.get(key, 0) + step
        best = max(best, sum(1 for n in running.values() if n > 0))
    return best


def all_finished(attempts) -> bool:
    """Every task's latest delivery has finished. Earlier deliveries of a task may never finish
    (held by a worker whose connection dropped, then restored and delivered again)."""
    latest: dict[str, Attempt] = {}
    for a in attempts:
        when = a.received or a.started or 0.0
        if a.id not in latest or when >= (latest[a.id].received or latest[a.id].started or 0.0):
            latest[a.id] = a
    return all(a.finished is not None for a in latest.values()
               if a.received is not None or a.started is not None)
