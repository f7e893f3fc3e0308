"""Lab 1 checker: ``pending_messages(r, queue)`` lists a queue's waiting messages, untouched."""

from __future__ import annotations

import datetime as dt

from celerylab.checks.common import LabCheckFailed, call_learner, checker, ok

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


@checker
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
