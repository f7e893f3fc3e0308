"""A ``redis.Redis`` that a lab checker can crash, or run in lockstep, between two commands.

Lab task code gets its client here (``db = chaos.connect(url)``). It behaves exactly like
``redis.Redis`` until a checker arms it, through keys in the same Redis, for one JOB: the first
argument of the Celery task that is running (a payment id, say):

    crash      SIGKILL the process right AFTER the job's k-th write command (or pipeline/
               transaction batch that writes), once: what the OOM killer can do between any two
               writes. A Lua script is one command, and a MULTI/EXEC transaction runs all its
               queued commands or, if the client dies before EXEC, none, with no other client's
               command in between, so neither is split. (It is no rollback: a command that fails
               while EXEC runs does not undo the others.) A plain pipeline
               (``transaction=False``) is no unit: Redis runs its commands one by one, so it is
               split here, command by command, like separate calls.
    lockstep   every command the job sends waits until the other delivery of the same job has
               reached the same command: two duplicates that run side by side interleave
               command by command, so a check-then-write race shows every time, not by luck.
               Where the two send different commands at one step (their code branched), a read
               goes first, then the write: the read sees the state before the write, the
               order a check-then-write race needs (left to chance, it would show half the
               time).

Commands on ``unwatched_keys`` (a given helper's own log, say) and commands sent outside a task
are never watched. Every watched command is logged before it is sent (``log``), so a checker can
tell when the answer wrote through a client of its own instead, and every write that succeeded is
logged once it has (``writes``: how many writes one run of a job makes, so a checker knows where
it can crash the next one; a write that raised, such as an EVALSHA the server answered NOSCRIPT,
is not counted).

Used by Lab 4 (exactly-once payments); the checker side is ``arm_crash`` / ``arm_lockstep`` /
``crashes`` / ``met`` / ``log`` / ``writes``.
"""

from __future__ import annotations

import json
import os
import signal
import time

import redis
from celery import signals
from redis.client import Pipeline

PREFIX = "celerylab:chaos:"
FIRST_WAIT = 10.0  # s a lockstep delivery waits for its twin at the first command (start jitter)
NEXT_WAIT = 1.0  # s at every later command (the twins only diverge where the code branches)

# used when the server refuses COMMAND (renamed on some managed Redis): anything else is a write
_READONLY_FALLBACK = {
    "get", "mget", "exists", "ttl", "pttl", "type", "strlen", "getrange", "hget", "hmget",
    "hgetall", "hexists", "hkeys", "hvals", "hlen", "sismember", "smismember", "smembers",
    "scard", "zscore", "zrange", "zcard", "zrank", "llen", "lrange", "lindex", "scan", "keys",
    "eval_ro", "evalsha_ro", "fcall_ro", "ping", "select", "watch", "unwatch", "multi", "exec",
    "discard", "script", "client", "hello", "auth", "info", "command", "echo", "time", "dbsize",
}
_SCRIPTS = {"eval", "evalsha", "fcall"}  # may write; Redis does not flag them "write"

_state: dict = {"pid": None, "control": None, "writes": None, "steps": {}, "read_step": None}


def _fresh() -> dict:
    """Per-process state (a pool child inherits the parent's, so reset it after a fork)."""
    if _state["pid"] != os.getpid():
        _state.update(pid=os.getpid(), control=None, writes=None, steps={}, read_step=None)
    return _state


@signals.task_prerun.connect(weak=False)
def _new_delivery(**_):
    _fresh()["steps"] = {}


def _name(args) -> str:
    head = args[0]
    if isinstance(head, bytes):
        head = head.decode()
    return str(head).split()[0].lower()


def _key(args) -> str | None:
    if len(args) < 2:
        return None
    key = args[1]
    return key.decode(errors="replace") if isinstance(key, bytes) else str(key)


def _keys(args) -> list[str]:
    """The keys one command names: a script's declared KEYS, or its first argument."""
    name = _name(args)
    if name in _SCRIPTS and len(args) >= 3:
        try:
            return [_key([None, k]) for k in args[3:3 + int(args[2])]]
        except (TypeError, ValueError):
            return []
    key = _key(args)
    return [key] if key is not None else []


def _current_job() -> tuple[str, str] | None:
    """(job, task id) of the Celery task running in this process, or None outside a task."""
    from celery import current_task
    try:
        if not current_task:
            return None
        req = current_task.request
        args = list(req.args or ())
        job = args[0] if args else next(iter((req.kwargs or {}).values()), None)
    except Exception:  # no task, or a request without arguments
        return None
    if job is None or req.id is None:
        return None
    return str(job), str(req.id)


class ChaosRedis(redis.Redis):
    """``redis.Redis``, plus the checker's crash and lockstep hooks (see the module doc)."""

    _chaos_url: str = ""
    _unwatched: frozenset = frozenset()

    # the hooks -----------------------------------------------------------------------------
    def _control(self) -> redis.Redis:
        st = _fresh()
        if st["control"] is None:
            st["control"] = redis.Redis.from_url(self._chaos_url, socket_timeout=10)
        return st["control"]

    def _is_write(self, name: str) -> bool:
        st = _fresh()
        if st["writes"] is None:
            try:
                table = self._control().command()
                st["writes"] = {n.lower() for n, info in table.items()
                                if "write" in (info.get("flags") or [])} | _SCRIPTS
            except redis.RedisError:
                st["writes"] = False
        if st["writes"] is False:
            return name not in _READONLY_FALLBACK
        return name in st["writes"]

    def _watched(self, commands) -> tuple[str, str] | None:
        """The running job, when at least one of ``commands`` is not on an unwatched key."""
        if all(_key(c) in self._unwatched for c in commands):
            return None
        return _current_job()

    def _before(self, job, names: list[str], keys=()) -> None:
        payment, task_id = job
        ctl = self._control()
        ctl.rpush(PREFIX + "log:" + payment, json.dumps(
            {"task": task_id, "pid": os.getpid(), "commands": names, "keys": list(keys)}))
        _fresh()["read_step"] = None
        if ctl.exists(PREFIX + "lockstep:" + payment):
            self._rendezvous(ctl, payment, task_id, any(self._is_write(n) for n in names))

    def _rendezvous(self, ctl, payment: str, task_id: str, writes: bool) -> None:
        st = _fresh()
        n = st["steps"][task_id] = st["steps"].get(task_id, 0) + 1
        key = f"{PREFIX}lockstep:{payment}:{n}"
        if not writes:  # registered before arriving: a writer that sees both here knows
            ctl.sadd(key + ":readers", task_id)
            st["read_step"] = key
        here = ctl.incr(key)
        deadline = time.monotonic() + (FIRST_WAIT if n == 1 else NEXT_WAIT)
        while here < 2 and time.monotonic() < deadline:
            time.sleep(0.002)
            here = int(ctl.get(key) or 0)
        if here < 2:
            return
        ctl.sadd(f"{PREFIX}met:{payment}", n)
        if writes and ctl.scard(key + ":readers"):  # the twin reads here: its read goes first
            deadline = time.monotonic() + NEXT_WAIT
            while not ctl.exists(key + ":read") and time.monotonic() < deadline:
                time.sleep(0.002)

    def _after(self, job, names: list[str], keys=()) -> None:
        if not any(self._is_write(n) for n in names):
            if _fresh()["read_step"]:  # a lockstep read has run: the twin's write may go
                self._control().set(_fresh()["read_step"] + ":read", 1)
            return
        payment, task_id = job
        ctl = self._control()
        nth = ctl.rpush(PREFIX + "writes:" + payment, json.dumps(
            {"task": task_id, "pid": os.getpid(), "commands": names, "keys": list(keys)}))
        armed_at = ctl.get(PREFIX + "crash:" + payment)
        # armed for this job's nth write (counted over its deliveries): fire, once
        if armed_at is not None and nth >= int(armed_at) and ctl.delete(PREFIX + "crash:" + payment):
            ctl.rpush(PREFIX + "crashes", json.dumps(
                {"job": payment, "task": task_id, "pid": os.getpid(), "after": names,
                 "write": nth}))
            os.kill(os.getpid(), signal.SIGKILL)

    # redis.Redis -----------------------------------------------------------------------------
    def execute_command(self, *args, **options):
        job = self._watched([args])
        if job is None:
            return super().execute_command(*args, **options)
        names, keys = [_name(args)], _keys(args)
        self._before(job, names, keys)
        result = super().execute_command(*args, **options)
        self._after(job, names, keys)
        return result

    def pipeline(self, transaction=True, shard_hint=None) -> Pipeline:
        pipe = ChaosPipeline(self.connection_pool, self.response_callbacks, transaction,
                             shard_hint)
        pipe._chaos_url, pipe._unwatched = self._chaos_url, self._unwatched
        return pipe


class ChaosPipeline(ChaosRedis, Pipeline):
    """A MULTI/EXEC transaction: its batch is watched as ONE command. A plain pipeline: each of
    its commands is watched (and can be crashed after) on its own."""

    _in_batch = False

    def execute_command(self, *args, **kwargs):
        return Pipeline.execute_command(self, *args, **kwargs)  # queue, or WATCH-mode immediate

    def immediate_execute_command(self, *args, **options):
        job = None if self._in_batch else self._watched([args])
        if job is None:
            return Pipeline.immediate_execute_command(self, *args, **options)
        names, keys = [_name(args)], _keys(args)
        self._before(job, names, keys)
        result = Pipeline.immediate_execute_command(self, *args, **options)
        self._after(job, names, keys)
        return result

    def execute(self, raise_on_error: bool = True):
        commands = [args for args, _ in self.command_stack]
        job = self._watched(commands) if commands else None
        if job is None:
            return Pipeline.execute(self, raise_on_error)
        if not self.transaction:
            return self._one_by_one(raise_on_error)
        names, keys = [_name(c) for c in commands], [k for c in commands for k in _keys(c)]
        self._before(job, names, keys)
        self._in_batch = True
        try:
            result = Pipeline.execute(self, raise_on_error)
        finally:
            self._in_batch = False
        self._after(job, names, keys)
        return result


    def _one_by_one(self, raise_on_error: bool) -> list:
        """A plain pipeline's commands as Redis runs them: one at a time, each watched."""
        queued = list(self.command_stack)
        self.reset()
        client = ChaosRedis(connection_pool=self.connection_pool)
        client._chaos_url, client._unwatched = self._chaos_url, self._unwatched
        results = []
        for args, options in queued:
            try:
                results.append(client.execute_command(*args, **options))
            except redis.ResponseError as exc:
                if raise_on_error:
                    raise
                results.append(exc)
        return results


def connect(url: str, unwatched_keys=(), **kwargs) -> ChaosRedis:
    """A client for ``url``, like ``redis.Redis.from_url(url)``; commands on ``unwatched_keys``
    are never crashed or held back."""
    client = ChaosRedis.from_url(url, **kwargs)
    client._chaos_url = url
    client._unwatched = frozenset(unwatched_keys)
    return client


# the checker's side ---------------------------------------------------------------------------
def arm_crash(r: redis.Redis, job: str, after: int = 1) -> None:
    """SIGKILL the process right after the job ``job``'s write number ``after`` (1 = its first
    write; counted over all its deliveries, so arm it before the job runs), once."""
    if after < 1:
        raise ValueError(f"after must be 1 or more, not {after}")
    r.set(PREFIX + "crash:" + job, after)


def armed(r: redis.Redis, job: str) -> bool:
    """The crash for ``job`` is armed and has not fired yet."""
    return bool(r.exists(PREFIX + "crash:" + job))


def arm_lockstep(r: redis.Redis, job: str) -> None:
    """Deliveries of ``job`` wait for each other at every command they send."""
    r.set(PREFIX + "lockstep:" + job, 1)


def crashes(r: redis.Redis, job: str | None = None) -> list[dict]:
    """The crashes that fired: job, task id, pid, the command(s) the process died after, and
    which write of the job that was (``write``, from 1)."""
    fired = [json.loads(x) for x in r.lrange(PREFIX + "crashes", 0, -1)]
    return [c for c in fired if job is None or c["job"] == job]


def met(r: redis.Redis, job: str) -> set[int]:
    """The command numbers at which two lockstep deliveries of ``job`` met."""
    return {int(n) for n in r.smembers(PREFIX + "met:" + job)}


def log(r: redis.Redis, job: str) -> list[dict]:
    """Every watched command (or batch) the job sent: task id, pid, command names, keys."""
    return [json.loads(x) for x in r.lrange(PREFIX + "log:" + job, 0, -1)]


def writes(r: redis.Redis, job: str) -> list[dict]:
    """Every write (command or batch) the job sent that succeeded, in order: task id, pid,
    command names, keys."""
    return [json.loads(x) for x in r.lrange(PREFIX + "writes:" + job, 0, -1)]
