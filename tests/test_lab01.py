"""Lab 1 (pending messages): the checker accepts right answers and rejects wrong ones,
with a busy-loop process beside the solution (the soak: beside all of it)."""

from __future__ import annotations

import ast
import base64
import datetime as dt
import json

import pytest
import redis
from conftest import solution_function

from celerylab.checks import LabCheckFailed, check_lab01
from celerylab.checks.lab01 import LAB01_PLAN, LAB01_QUEUE, _list_names, _taken_order

pytestmark = pytest.mark.usefixtures("hog")

STEPS = (0, 3, 6, 9)
SEP = "\x06\x16"


def _solution():
    return solution_function("lab01_pending_messages", "pending_messages")


def _keys(queue, steps=STEPS):
    return [queue if step == 0 else f"{queue}{SEP}{step}" for step in steps]


def _decode(raw, args_from_body=True):
    env = json.loads(raw)
    h = env["headers"]
    if args_from_body:
        args, kwargs, _ = json.loads(base64.b64decode(env["body"]))
    else:
        args, kwargs = ast.literal_eval(h["argsrepr"]), ast.literal_eval(h["kwargsrepr"])
    return {"task": h["task"], "id": h["id"], "args": args, "kwargs": kwargs,
            "retries": h["retries"], "eta": h["eta"]}


# --- right answers --------------------------------------------------------------------------

def test_lab01_checker_accepts_the_solution(stack, capsys):
    check_lab01(_solution(), stack)
    out = capsys.readouterr().out
    assert "Lab 1 passed" in out
    assert "from all 4 lists of the queue" in out


def _unusual(r, queue):
    """Correct but unlike the solution: one transactional pipeline of LLEN, then LINDEX from the
    right end, lists found by SCAN and ordered by their step; tuples for args, datetimes for
    eta, extra keys, a dict subclass."""
    names = [k.decode() for k in r.scan_iter(match=f"{queue}*", _type="list")]
    names = [n for n in names if n == queue or n.startswith(queue + SEP)]
    names.sort(key=lambda n: 0 if n == queue else int(n.rsplit(SEP, 1)[1]))
    with r.pipeline() as pipe:
        for n in names:
            pipe.llen(n)
        lengths = pipe.execute()
    with r.pipeline(transaction=False) as pipe:
        for n, length in zip(names, lengths, strict=True):
            for i in range(1, length + 1):
                pipe.lindex(n, -i)
        raws = pipe.execute()

    class Message(dict):
        pass

    out = []
    for raw in raws:
        env = json.loads(raw.decode("utf-8"))
        body = base64.b64decode(env["body"]).decode("utf-8")
        args, kwargs, embed = json.loads(body)
        eta = env["headers"]["eta"]
        out.append(Message(task=env["headers"]["task"], id=env["headers"]["id"],
                           args=tuple(args), kwargs=kwargs,
                           retries=int(env["headers"]["retries"]),
                           eta=dt.datetime.fromisoformat(eta) if eta else None,
                           priority=env["properties"]["priority"], queue=queue))
    return out


def test_lab01_checker_accepts_an_unusual_right_answer(stack, capsys):
    check_lab01(_unusual, stack)
    assert "Lab 1 passed" in capsys.readouterr().out


def test_lab01_expected_order_is_the_one_kombu_takes(stack):
    """The checker lets kombu define the order; this pins what kombu 5.7 does, by hand."""
    assert _list_names(stack, LAB01_QUEUE) == _keys(LAB01_QUEUE)
    r = stack.redis
    app = stack.control
    r.delete(*_keys(LAB01_QUEUE))
    ids = [app.send_task(name, args=args, kwargs=kwargs, queue=LAB01_QUEUE, **opts).id
           for name, args, kwargs, opts in LAB01_PLAN]
    snapshot = {k: r.lrange(k, 0, -1) for k in _keys(LAB01_QUEUE)}
    assert [len(v) for v in snapshot.values()] == [4, 2, 2, 1]
    # sent as: none, 6, 5, 0, 2, 9, 3, 7, none -> bare list FIFO, then steps 3, 6, 9, each FIFO
    assert _taken_order(stack, snapshot) == [ids[i] for i in (0, 3, 4, 8, 2, 6, 1, 7, 5)]
    assert [_decode(raw)["id"] for raw in reversed(snapshot[LAB01_QUEUE])] == \
        [ids[i] for i in (0, 3, 4, 8)]
    r.delete(*_keys(LAB01_QUEUE))


# --- wrong answers --------------------------------------------------------------------------

def _stub(r, queue):
    raise NotImplementedError


def _consumes(r, queue):
    out = _solution()(r, queue)
    r.delete(*_keys(queue))
    return out


def _pop_and_push_back(r, queue):
    """Reads by popping every message and pushing it back: the final lists are identical."""
    out = []
    for key in _keys(queue):
        popped = []
        while (raw := r.rpop(key)) is not None:
            popped.append(raw)
        for raw in popped:
            r.lpush(key, raw)
        out += [_decode(raw) for raw in popped]
    return out


def _rotates_in_a_script(r, queue):
    """Reads every message by rotating each list once inside a Lua script: atomic, identical
    lists afterwards, and no write command on the client side, but Redis counts the changes."""
    rotate = r.register_script(
        "local out = {} local n = redis.call('LLEN', KEYS[1]) "
        "for i = 1, n do out[i] = redis.call('RPOPLPUSH', KEYS[1], KEYS[1]) end return out")
    return [_decode(raw) for key in _keys(queue) for raw in rotate(keys=[key])]


def _rewrites(r, queue):
    """Reads, then tidies the lists (JSON with sorted keys): same messages, other bytes."""
    out = _solution()(r, queue)
    for key in _keys(queue):
        items = r.lrange(key, 0, -1)
        if items:
            r.delete(key)
            r.rpush(key, *[json.dumps(json.loads(x), sort_keys=True) for x in items])
    return out


def _pops_on_a_client_of_its_own(r, queue):
    """Pops and pushes back through a second client on the same pool, out of the recorder's
    sight: only Redis's own change counter can tell."""
    return _pop_and_push_back(redis.Redis(connection_pool=r.connection_pool), queue)


def _argsrepr(r, queue):
    return [_decode(raw, args_from_body=False)
            for key in _keys(queue) for raw in reversed(r.lrange(key, 0, -1))]


def _missing_key_in_second(r, queue):
    out = _solution()(r, queue)
    if len(out) > 1:
        del out[1]["eta"]
    return out


def _ignores_priorities(r, queue):
    return [_decode(raw) for raw in reversed(r.lrange(queue, 0, -1))]


def _every_key_that_starts_like_it(r, queue):
    """Finds the lists by a prefix pattern: picks up another queue whose name starts the same."""
    names = sorted(k.decode() for k in r.keys(f"{queue}*"))
    return [_decode(raw) for key in names for raw in reversed(r.lrange(key, 0, -1))]


def _wrong_id(r, queue):
    """Takes the delivery tag for the id."""
    return [{**m, "id": json.loads(raw)["properties"]["delivery_tag"]}
            for m, raw in zip(_solution()(r, queue), _raws(r, queue), strict=True)]


def _root_id_as_id(r, queue):
    """Reads the id from root_id: the same as id for a message a client sent, not for a child's."""
    out = []
    for key in _keys(queue):
        for raw in reversed(r.lrange(key, 0, -1)):
            m = _decode(raw)
            m["id"] = json.loads(raw)["headers"]["root_id"]
            out.append(m)
    return out


def _first_hundred(r, queue):
    """A capped read: the first 100 items of each list (LRANGE 0 99)."""
    return [_decode(raw) for key in _keys(queue) for raw in reversed(r.lrange(key, 0, 99))]


def _raws(r, queue):
    return [raw for key in _keys(queue) for raw in reversed(r.lrange(key, 0, -1))]


def _priorities_reversed(r, queue):
    """Thinks 9 is the most urgent: reads the steps from 9 down to 0."""
    return [_decode(raw) for key in _keys(queue, STEPS[::-1])
            for raw in reversed(r.lrange(key, 0, -1))]


def _sorted_by_exact_priority(r, queue):
    """Sorts every message by its own priority (stable): ignores that a priority rounds down to
    a step and that messages of one step wait in one FIFO list."""
    msgs = []
    for key in _keys(queue):
        for raw in reversed(r.lrange(key, 0, -1)):
            msgs.append((json.loads(raw)["properties"].get("priority") or 0, _decode(raw)))
    return [m for _, m in sorted(msgs, key=lambda pm: pm[0])]


def _newest_first(r, queue):
    return _solution()(r, queue)[::-1]


def _undecoded(r, queue):
    out = []
    for key in _keys(queue):
        for raw in reversed(r.lrange(key, 0, -1)):
            env = json.loads(raw)
            out.append({"task": env["headers"]["task"], "id": env["headers"]["id"],
                        "args": env["body"], "kwargs": {}, "retries": 0, "eta": None})
    return out


def _no_eta(r, queue):
    return [{**m, "eta": None} for m in _solution()(r, queue)]


def _retries_missing(r, queue):
    return [{**m, "retries": 0} for m in _solution()(r, queue)]


def _returns_none(r, queue):
    _solution()(r, queue)


def _returns_a_dict(r, queue):
    return {m["id"]: m for m in _solution()(r, queue)}


def _list_of_strings(r, queue):
    return [json.dumps(m) for m in _solution()(r, queue)]


def _retries_as_text(r, queue):
    return [{**m, "retries": str(m["retries"])} for m in _solution()(r, queue)]


@pytest.mark.parametrize("wrong, hint", [
    (_stub, "not written yet"),
    (_consumes, "it consumed them"),
    (_pop_and_push_back, r"commands that can change Redis \(RPOP x134, LPUSH x130\)"),
    (_rotates_in_a_script, "Redis counted 130 changes to its data"),
    (_rewrites, "no longer byte for byte"),
    (_pops_on_a_client_of_its_own, "Redis counted 260 changes to its data"),
    (_argsrepr, "how the producer chose to display the arguments"),
    (_missing_key_in_second, r"Item 2 of the list you returned lacks the key\(s\) \['eta'\]"),
    (_ignores_priorities, "you returned 125. The missing ones were all sent with a priority of 3"),
    (_every_key_that_starts_like_it, "waits in another queue, 'lab01-check-eu'"),
    (_wrong_id, "not the ids of the queued messages"),
    (_root_id_as_id, "not the ids of the queued messages"),
    (_first_hundred, "The queue holds 130 messages; you returned 105. Missing: .* and 20 more"),
    (_priorities_reversed, "at position 1 you list the 6th message sent"),
    (_sorted_by_exact_priority, r"at position 3 you list the 9th message sent \(shop.charge"),
    (_newest_first, "wrong order"),
    (_undecoded, "the body is encoded"),
    (_no_eta, "carries its ETA in a header"),
    (_retries_missing, "retries is 0, expected 2"),
    (_returns_none, "returned NoneType"),
    (_returns_a_dict, "returned dict"),
    (_list_of_strings, "Item 1 of the list you returned is a str"),
    (_retries_as_text, "retries is a str"),
])
def test_lab01_checker_rejects_wrong_answers(stack, wrong, hint):
    with pytest.raises(LabCheckFailed, match=hint) as failure:
        check_lab01(wrong, stack)
    assert "Traceback" not in str(failure.value)


def test_lab01_checker_still_sees_writes_when_redis_will_not_describe_its_commands(
        stack, monkeypatch):
    """An opt-in Redis whose ACLs refuse COMMAND: the checker falls back to its own list."""
    def refused(*args, **kwargs):
        raise redis.ResponseError("NOPERM this user has no permissions to run 'command'")

    monkeypatch.setattr(stack.redis, "command", refused)
    with pytest.raises(LabCheckFailed, match=r"\(RPOP x134, LPUSH x130\)"):
        check_lab01(_pop_and_push_back, stack)
