"""Lab 1 checker: ``pending_messages(r, queue)`` lists a queue's waiting messages, untouched.

What it verifies, on the live Redis:

* an empty queue gives ``[]``;
* the answer only READS Redis: the learner gets a client that records every command it sends
  (its pipelines' and scripts' too), and any command Redis itself flags as a write fails the
  check; when the recorded commands cannot tell (a script), Redis's own change counter decides;
  the queue's lists are also compared byte for byte before and after;
* the return value has the lab's shape: a list of dicts, every dict with every key, values of the
  right types;
* every waiting message appears once, including those in kombu's priority sub-lists, in the order
  a worker takes them (the order is not computed here: kombu itself takes the messages off a copy
  of the queue, bare list first, then the priority steps);
* task, id, args and kwargs (from the body, not from the ``argsrepr`` display headers), retries
  and eta match what was published.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import time
from collections import Counter

import redis

from celerylab.checks.common import LabCheckFailed, call_learner, checker, ok

LAB01_QUEUE = "lab01-check"
LAB01_COPY = "lab01-check-order"
LAB01_NEIGHBOUR = "lab01-check-eu"  # another queue whose name starts with this one's
LAB01_KEYS = ("task", "id", "args", "kwargs", "retries", "eta")
SCRIPT_COMMANDS = {"eval", "evalsha", "fcall"}
def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"

# (task name, args, kwargs, send_task options): priorities cover every step, a step shared by a
# message without priority and one with 2, a step whose messages were sent with 5 then 3, a
# countdown, retries, a producer that hides its arguments from logs with argsrepr/kwargsrepr, a
# message sent by another task (its root_id and parent_id are not its id), and a backlog of 120
# messages in the bare list (a capped read such as LRANGE 0 99 misses some).
LAB01_PLAN = [
    ("shop.charge", [42, "EUR"], {"idempotency_key": "k-1"}, {}),
    ("shop.send_receipt", ["ada@example.com"], {}, {"countdown": 3600, "priority": 6}),
    ("shop.charge", [7, "GBP"], {}, {"retries": 2, "priority": 5}),
    ("reports.build", [], {"month": "2026-11", "tags": ["café", 3]}, {"priority": 0}),
    ("shop.pay", ["4111 1111 1111 1111", 12.5], {"cvv": "123"},
     {"priority": 2, "argsrepr": "['****', 12.5]", "kwargsrepr": "{'cvv': '***'}"}),
    ("reports.purge", [], {}, {"priority": 9}),
    ("shop.refund", [[1, 2], {"why": "duplicate"}], {}, {"priority": 3}),
    ("shop.notify", ["bob"], {"channel": "sms"}, {"priority": 7, "retries": 1}),
    ("shop.charge", [9, "USD"], {}, {}),
]
LAB01_MORE = [  # published after the plan: a child task's message, then the backlog
    ("shop.receipt", ["r-7"], {}, {"root_id": "6e0c1b52-0000-4000-8000-00000000c0de",
                                   "parent_id": "6e0c1b52-0000-4000-8000-00000000beef"}),
    *[("shop.ping", [i], {}, {}) for i in range(120)],
]


class _Records:
    """Notes every command sent through this client (shared list ``sent``)."""

    sent: list

    def execute_command(self, *args, **options):
        self.sent.append(args)
        return super().execute_command(*args, **options)

    def pipeline(self, transaction=True, shard_hint=None):
        pipe = _RecordingPipeline(self.connection_pool, self.response_callbacks, transaction,
                                  shard_hint)
        pipe.sent = self.sent
        return pipe


class _RecordingPipeline(_Records, redis.client.Pipeline):
    pass


class _RecordingRedis(_Records, redis.Redis):
    """The client the learner's function gets: a plain redis-py client that keeps a log."""

    def __init__(self, *args, **kwargs):
        self.sent = []
        super().__init__(*args, **kwargs)


def _short(value, n: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def _name(args: tuple) -> str:
    first = args[0] if args else ""
    if isinstance(first, bytes):
        first = first.decode(errors="replace")
    return str(first).split(" ")[0].lower()


def _writes(sent: list, flags: dict) -> list[str]:
    """The commands Redis flags as writes (SORT only with STORE), upper-case, in sending order."""
    out = []
    for args in sent:
        name = _name(args)
        writes = "write" in flags.get(name, {}).get("flags", ())
        if name == "sort":
            writes = any(str(a).upper() == "STORE" for a in args[1:])
        if writes:
            out.append(name.upper())
    return out


# When a Redis (an opt-in REDIS_URL with ACLs) will not describe its commands: the writes a
# queue reader might send.
FALLBACK_WRITES = ("lpop", "rpop", "lpush", "rpush", "lpushx", "rpushx", "lmove", "blmove",
                   "rpoplpush", "brpoplpush", "blpop", "brpop", "lmpop", "blmpop", "lset", "linsert",
                   "lrem", "ltrim", "del", "unlink", "rename", "renamenx", "copy", "restore",
                   "set", "expire", "pexpire", "persist", "flushdb", "flushall")


def _command_flags(r) -> dict:
    try:
        return r.command()
    except redis.RedisError:
        return {name: {"flags": ["write"]} for name in FALLBACK_WRITES}


def _dirty(r) -> int:
    """Redis's count of changes to its data since the last save (the course runs --save '')."""
    return int(r.info("persistence").get("rdb_changes_since_last_save", 0))


def _list_names(stack, queue: str) -> list[str]:
    """The queue's Redis lists in the order a worker empties them (kombu's own naming)."""
    with stack.control.connection_for_write() as conn:
        channel = conn.default_channel
        return [channel._q_for_pri(queue, step) for step in channel.priority_steps]


def _snapshot(r, names: list[str]) -> dict[str, list[bytes]]:
    return {name: r.lrange(name, 0, -1) for name in names}


def _taken_order(stack, snapshot: dict[str, list[bytes]]) -> list[str]:
    """Copy the queue's lists to a scratch queue and let kombu take them off, as a consumer does."""
    names = _list_names(stack, LAB01_COPY)
    r = stack.redis
    r.delete(*names)
    for copy, items in zip(names, snapshot.values(), strict=True):
        if items:
            r.rpush(copy, *items)
    ids = []
    with stack.control.connection_for_write() as conn:
        channel = conn.default_channel
        while (message := channel.basic_get(LAB01_COPY, no_ack=True)) is not None:
            ids.append(message.headers["id"])
    r.delete(*names)
    return ids


def _lab01_enqueue(stack, names: list[str], neighbour: list[str]) -> tuple[dict, set]:
    """Publish the plan (no worker consumes this queue) and one message on the neighbour queue;
    return what each message of the plan should show, and the neighbour's message id."""
    app = stack.control
    stack.redis.delete(*names, *neighbour)
    other = app.send_task("shop.charge", args=[5, "EUR"], queue=LAB01_NEIGHBOUR, priority=3).id
    expected = {}
    for n, (name, args, kwargs, opts) in enumerate(LAB01_PLAN + LAB01_MORE):
        res = app.send_task(name, args=args, kwargs=kwargs, queue=LAB01_QUEUE, **opts)
        priority = opts.get("priority")
        shown = None
        if "argsrepr" in opts:
            shown = (ast.literal_eval(opts["argsrepr"]), ast.literal_eval(opts["kwargsrepr"]))
        expected[res.id] = {
            "task": name, "id": res.id, "args": args, "kwargs": kwargs, "shown": shown,
            "retries": opts.get("retries", 0), "countdown": "countdown" in opts,
            "label": (f"the {ordinal(n + 1)} message sent ({name}, "
                      + ("no priority)" if priority is None else f"priority {priority})")),
            "priority": priority or 0,
        }
    return expected, {other}


def _envelope_id(raw: bytes) -> str:
    return json.loads(raw)["headers"]["id"]


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


def _call_watched(pending_messages, stack, queue: str, names: list[str], flags: dict | None):
    """Call the learner's function with a recording client; fail if it changed anything.

    ``flags`` (Redis's COMMAND table) None: judge by the data only, not by the commands sent (on
    an empty queue a popping command changes nothing, and the hint would not be true)."""
    r = stack.redis
    before = _snapshot(r, names)
    spy = _RecordingRedis.from_url(stack.url, socket_timeout=10)
    try:
        dirty_before = _dirty(r)
        t0 = time.monotonic()
        got = call_learner(pending_messages, spy, queue, what="pending_messages")
        elapsed = time.monotonic() - t0
        dirty = _dirty(r) - dirty_before
    finally:
        spy.close()
    after = _snapshot(r, names)
    held = sum(map(len, before.values()))
    left = sum(map(len, after.values()))
    if left < held:
        raise LabCheckFailed(f"The queue held {held} messages before your function ran and {left} "
                             "after: it consumed them. Read the lists without removing anything "
                             "(which Redis list commands only read?).")
    if left > held:
        raise LabCheckFailed(f"The queue held {held} messages before your function ran and {left} "
                             "after: it added messages. Listing a queue must leave it as it was.")
    if after != before:
        raise LabCheckFailed(f"The queue still holds {held} messages, but they are no longer byte "
                             "for byte what was there before your function ran (other bytes, or "
                             "another order): it rewrote the queue. Listing must leave it as it "
                             "was.")
    writes = _writes(spy.sent, flags) if flags is not None else []
    if writes:
        counts = ", ".join(f"{name} x{n}" for name, n in Counter(writes).items())
        raise LabCheckFailed(
            f"The queue looks the same afterwards, but while your function ran it sent "
            f"{len(writes)} commands that can change Redis ({counts}): it took messages off the "
            "queue and put them back. Meanwhile a worker could have taken a message out of "
            "turn, and a crash in between would have lost what was off the queue. Listing a "
            "queue must only read it (which Redis list commands only read?).")
    scripted = any(_name(args) in SCRIPT_COMMANDS for args in spy.sent)
    if dirty > 0 and (scripted or _quiet_without_learner(r, elapsed)):
        raise LabCheckFailed(
            f"The queue looks the same afterwards, but Redis counted {dirty} changes to its data "
            "while your function ran (a script or another client of yours wrote to it). Listing "
            "a queue must only read it.")
    return got, held


def _quiet_without_learner(r, elapsed: float) -> bool:
    """True if Redis's data stays unchanged for as long as the learner's call took: then the
    changes counted during the call were the call's (another client may share this server)."""
    start = _dirty(r)
    time.sleep(min(max(elapsed, 0.2), 2.0))
    return _dirty(r) == start


def _validate(got) -> None:
    """The lab's shape: a list of dicts with every key, values of the right types."""
    if not isinstance(got, list):
        raise LabCheckFailed(f"pending_messages returned {type(got).__name__} ({_short(got, 80)}); "
                             "expected a list of dicts (an empty list for an empty queue).")
    for i, m in enumerate(got, 1):
        where = f"Item {i} of the list you returned"
        if not isinstance(m, dict):
            raise LabCheckFailed(f"{where} is a {type(m).__name__} ({_short(m, 60)}), not a dict: "
                                 "expected one dict per message.")
        missing = [k for k in LAB01_KEYS if k not in m]
        if missing:
            raise LabCheckFailed(f"{where} lacks the key(s) {missing}: every dict needs the keys "
                                 f"{list(LAB01_KEYS)}.")
        for key in ("args", "kwargs"):
            if isinstance(m[key], (str, bytes)):
                raise LabCheckFailed(f"{where}: {key} came back as text ({_short(m[key])}): the "
                                     "body is encoded. Decode it (its encoding is in "
                                     "properties.body_encoding), then parse the JSON.")
        kinds = {"task": (str,), "id": (str,), "args": (list, tuple), "kwargs": (dict,),
                 "retries": (int,), "eta": (str, dt.datetime, type(None))}
        for key, types in kinds.items():
            value = m[key]
            if not isinstance(value, types) or (key == "retries" and isinstance(value, bool)):
                names = " or ".join("None" if t is type(None) else t.__name__ for t in types)
                raise LabCheckFailed(f"{where}: {key} is a {type(value).__name__} ({_short(value)})"
                                     f"; expected {names}.")


def _check_membership(got_ids: list[str], want_ids: list[str], expected: dict,
                      elsewhere: set) -> None:
    if elsewhere & set(got_ids):
        raise LabCheckFailed(f"You returned a message that waits in another queue, "
                             f"{LAB01_NEIGHBOUR!r} (its name starts with {LAB01_QUEUE!r}): a "
                             "worker of this queue would never take it.")
    unknown = [i for i in got_ids if i not in expected]
    if unknown:
        raise LabCheckFailed(f"{len(unknown)} of the ids you returned ({_short(unknown[0], 50)}"
                             ") are not the ids of the queued messages. Where in the envelope "
                             "does the task id live?")
    twice = [i for i, n in Counter(got_ids).items() if n > 1]
    if twice:
        raise LabCheckFailed(f"Your list names {expected[twice[0]]['label']} "
                             f"{got_ids.count(twice[0])} times; each waiting message appears once.")
    missing = [i for i in want_ids if i not in got_ids]
    if missing:
        labels = "; ".join(expected[i]["label"] for i in missing[:5])
        if len(missing) > 5:
            labels += f"; and {len(missing) - 5} more"
        if all(expected[i]["priority"] >= 3 for i in missing):
            raise LabCheckFailed(
                f"The queue holds {len(want_ids)} messages; you returned {len(got_ids)}. The "
                f"missing ones were all sent with a priority of 3 or more: {labels}. Where does "
                "Redis keep those?")
        raise LabCheckFailed(f"The queue holds {len(want_ids)} messages; you returned "
                             f"{len(got_ids)}. Missing: {labels}.")


def _check_order(got_ids: list[str], want_ids: list[str], expected: dict,
                 list_of: dict[str, str]) -> None:
    if got_ids == want_ids:
        return
    reversed_lists = []
    for name in dict.fromkeys(list_of.values()):
        mine = [i for i in got_ids if list_of[i] == name]
        theirs = [i for i in want_ids if list_of[i] == name]
        if len(mine) > 1:
            reversed_lists.append(mine == theirs[::-1])
    if reversed_lists and all(reversed_lists):
        raise LabCheckFailed("Right messages, wrong order: among the messages that wait in one "
                             "Redis list you list the newest first; a worker takes the oldest "
                             "first. Which end of a list do producers push to, and which end do "
                             "workers pop from?")
    k = next(k for k, (a, b) in enumerate(zip(got_ids, want_ids, strict=True)) if a != b)
    raise LabCheckFailed(f"Right messages, but not in the order a worker takes them: at position "
                         f"{k + 1} you list {expected[got_ids[k]]['label']}, but a worker takes "
                         f"{expected[want_ids[k]]['label']} first.")


def _check_fields(got: list[dict], expected: dict) -> None:
    for m in got:
        want = expected[m["id"]]
        label = want["label"]
        if m["task"] != want["task"]:
            raise LabCheckFailed(f"For {label}: task is {m['task']!r}, expected the task name the "
                                 "producer sent. Look at the headers.")
        args, kwargs = list(m["args"]), dict(m["kwargs"])
        if args == want["args"] and kwargs == want["kwargs"]:
            continue
        if want["shown"] is not None and (args == want["shown"][0]
                                          or kwargs == want["shown"][1]):
            raise LabCheckFailed(
                f"For {label}: you returned args {args!r} and kwargs {kwargs!r}, but a worker "
                "would call the task with other values. What you returned is how the producer "
                "chose to display the arguments in logs (it hides a card number), not the "
                "arguments the message carries.")
        raise LabCheckFailed(f"For {label}: args/kwargs are {args!r} / {kwargs!r}, expected "
                             f"{want['args']!r} / {want['kwargs']!r}. The decoded body is a list "
                             "of three things: which are they?")
    for m in got:
        want = expected[m["id"]]
        if m["retries"] != want["retries"]:
            raise LabCheckFailed(f"For {want['label']}: retries is {m['retries']!r}, expected "
                                 f"{want['retries']}. It is a header, not part of the body.")
        if not _same_eta(m["eta"], want["countdown"]):
            raise LabCheckFailed(f"For {want['label']}: eta is {m['eta']!r}. A message sent with "
                                 "a countdown carries its ETA in a header; the others carry None.")


@checker
def check_lab01(pending_messages, stack) -> None:
    """Lab 1: ``pending_messages(r, queue)`` lists a queue's messages in the order a worker takes
    them, reading Redis only."""
    r = stack.redis
    flags = _command_flags(r)
    empty_names = _list_names(stack, "lab01-no-such-queue")
    r.delete(*empty_names)
    empty, _ = _call_watched(pending_messages, stack, "lab01-no-such-queue", empty_names, None)
    if empty != []:
        _validate(empty)
        raise LabCheckFailed(f"For a queue with no messages it returned {_short(empty, 80)}; "
                             "expected [].")
    ok("an empty queue gives []")

    names = _list_names(stack, LAB01_QUEUE)
    neighbour = _list_names(stack, LAB01_NEIGHBOUR)
    expected, elsewhere = _lab01_enqueue(stack, names, neighbour)
    snapshot = _snapshot(r, names)
    list_of = {}
    for name, items in snapshot.items():
        for raw in items:
            list_of[_envelope_id(raw)] = name
    try:
        got, held = _call_watched(pending_messages, stack, LAB01_QUEUE, names, flags)
        ok(f"only read Redis: {held} messages still queued, byte for byte, and no command that "
           "writes")
        _validate(got)
        ok("a list of dicts, each with task, id, args, kwargs, retries and eta")
        want_ids = _taken_order(stack, snapshot)
        got_ids = [m["id"] for m in got]
        _check_membership(got_ids, want_ids, expected, elsewhere)
        spread = sum(1 for items in snapshot.values() if items)
        ok(f"every message once, from all {spread} lists of the queue (priority sub-lists too)")
        _check_order(got_ids, want_ids, expected, list_of)
        ok("in the order a worker takes them (bare list first, then priority steps 3, 6, 9)")
        _check_fields(got, expected)
        ok("task, id, args and kwargs (from the body), retries and eta match what was sent")
    finally:
        r.delete(*names, *neighbour)
    print("Lab 1 passed: you can read a queue, priorities and all, without touching it.")
