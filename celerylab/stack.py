"""One notebook's live stack: its broker, its workers, its recordings, and their cleanup.

    stack = celerylab.start("ch01")          # a private Redis (or a claimed database of REDIS_URL)
    w = stack.spawn_worker("ch01_tasks", concurrency=2)
    ...
    stack.stop()                             # also at kernel exit, and by the watchdog on a crash

Each notebook gets its own namespace (its own Redis instance, or its own database on an external
Redis), so notebooks run in any order, in parallel, and twice in a row with the same results.
"""

from __future__ import annotations

import ast
import atexit
import os
import shutil
import sys
import time
import weakref
from contextlib import contextmanager

import redis
from celery import Celery

from celerylab import recording
from celerylab.broker import RedisServer, claim_database, redact, release_database
from celerylab.errors import CourseError
from celerylab.processes import Launcher, Watchdog, home, stop_groups
from celerylab.workers import Worker

_current: Stack | None = None
_urls: set[str] = set()  # every broker URL a stack of this kernel has had
# task modules (and their Celery apps) imported for an earlier stack: object -> module name
_retired: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Stack:
    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.rundir = home() / "run" / f"{namespace}-{os.getpid()}"
        self.server: RedisServer | None = None
        self.url = ""
        self.external = bool(os.environ.get("REDIS_URL"))
        self.watchdog = Watchdog.get()
        self._workers: list[Worker] = []
        self.services: list = []  # other processes of this notebook (Flower, Prometheus), stopped with it
        self._redis: redis.Redis | None = None
        self._control: Celery | None = None
        self.broker_seconds: float | None = None
        self.stopped = False

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> Stack:
        t0 = time.monotonic()
        self.rundir.mkdir(parents=True, exist_ok=True)
        os.environ["CELERYLAB_NAMESPACE"] = self.namespace  # its processes' pid notes name it
        if os.environ.get("CELERYLAB_WORKER_LAUNCH", "fork") != "exec":
            Launcher.get()  # imports celery for the workers to come, while Redis starts
        if self.external:
            self.url = claim_database(os.environ["REDIS_URL"], self.namespace)
        else:
            self.server = RedisServer(self.rundir).start(watchdog=self.watchdog)
            self.url = self.server.url
        self.broker_seconds = time.monotonic() - t0
        _urls.add(self.url)
        os.environ.update(self.env)  # the kernel's own task modules read the same variables
        return self

    @property
    def env(self) -> dict[str, str]:
        """What workers (and task modules) read to find this notebook's broker."""
        return {"CELERYLAB_BROKER_URL": self.url, "CELERYLAB_NAMESPACE": self.namespace}

    @property
    def redis(self) -> redis.Redis:
        """A redis-py client on this notebook's database."""
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.url, socket_timeout=10)
        return self._redis

    @property
    def control(self) -> Celery:
        """A Celery app bound to this broker, for ``control.ping`` and ``control.inspect``."""
        if self._control is None:
            self._control = Celery("celerylab-control", broker=self.url, backend=self.url,
                                   set_as_current=False)
            self._control.conf.update(accept_content=["json"], task_serializer="json",
                                      result_serializer="json", broker_connection_timeout=3)
        return self._control

    def worker(self, app: str, **options) -> Worker:
        """A Worker (not started yet): see ``Worker`` for the options; ``.command`` shows the flags."""
        return Worker(self, app, **options)

    def spawn_worker(self, app: str, **options) -> Worker:
        return self.worker(app, **options).start()

    def start_workers(self, *workers: Worker) -> list[Worker]:
        """Start several workers at once (they boot in parallel) and wait until all are ready."""
        import threading
        errors: list[BaseException] = []

        def boot(w: Worker) -> None:
            try:
                w.start()
            except BaseException as exc:  # reported below, in the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=boot, args=(w,)) for w in workers]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        except BaseException:  # interrupted (Ctrl-C, a kernel interrupt) while they boot
            for t in threads:
                if t.ident is not None:
                    t.join(timeout=30)  # let each boot end, then stop what did start
            self.stop_workers()
            raise
        if errors:
            self.stop_workers()
            raise errors[0]
        return list(workers)

    def stop_workers(self, timeout: float = 10.0) -> None:
        """Warm-stop every worker of this notebook, in parallel."""
        stop_groups([w.group for w in self._workers if w.alive], timeout)
        self._workers = [w for w in self._workers if w.alive]

    def stop(self) -> None:
        """Stop the workers, then the broker (or release the claimed external database)."""
        global _current
        self.stop_workers()  # first: a worker whose broker (a service) went first would retry it
        for service in self.services:
            service.stop(timeout=5)
        self.services = []
        if self.server:
            self.server.stop()
        elif self.url:
            release_database(self.url)
        if self._redis is not None:
            self._redis.close()
        shutil.rmtree(self.rundir, ignore_errors=True)
        self.stopped = True
        if _current is self:
            _current = None

    def reset(self) -> None:
        """Empty this notebook's broker database: queues, results, recordings."""
        self.stop_workers()
        self.redis.flushdb()
        if self.external:
            claim_database(self.url, self.namespace)

    # what a learner looks at ------------------------------------------------------------------
    def records(self, ids=None) -> list[recording.Attempt]:
        """Recorded attempts (sent/received/started/finished, worker, pid) for ``ids`` or all."""
        return recording.attempts(self.redis, ids)

    def clear_records(self) -> None:
        self.redis.delete(recording.EVENTS)

    def wait_for(self, ids, timeout: float = 30.0, states=("SUCCESS", "FAILURE")) -> list:
        """Block until every task id has a finished attempt in ``states`` (polling the recording)."""
        ids = list(ids)
        deadline = time.monotonic() + timeout
        while True:
            done = {a.id for a in self.records(ids) if a.state in states}
            if len(done) == len(set(ids)):
                return self.records(ids)
            if time.monotonic() > deadline:
                missing = len(set(ids)) - len(done)
                raise CourseError(
                    f"{missing} of {len(set(ids))} tasks had not finished after {timeout:.0f} s.\n"
                    "Is a worker running and consuming their queue? Try stack.health().")
            time.sleep(0.05)

    def wait_until(self, predicate, timeout: float = 10.0, what: str = "the condition"):
        """Poll ``predicate()`` every 20 ms until it returns something truthy; return that."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise CourseError(f"Waited {timeout:.0f} s for {what}, in vain. "
                                  "stack.health() shows what is running.")
            time.sleep(0.02)

    def outcome(self, task_id: str) -> str | None:
        """SUCCESS or FAILURE once any attempt of the task ended so (a pool child killed for good,
        recorded as LOST, is a FAILURE); None while it is not done.

        From the recording, not the result backend: when a retry runs with a 0 s delay, its
        SUCCESS can land between the older attempt's read and write of RETRY (a narrow race), and
        the backend then keeps RETRY.
        """
        states = {a.state for a in self.records([task_id])}
        return "SUCCESS" if "SUCCESS" in states else "FAILURE" if states & {"FAILURE", "LOST"} \
            else None

    def started(self, task_id: str, timeout: float = 10.0):
        """Wait until a worker has started ``task_id``; return that attempt."""
        return self.wait_until(
            lambda: next((a for a in self.records([task_id]) if a.started), None),
            timeout, f"task {task_id[:8]} to start")

    def processes(self) -> list[dict]:
        rows = []
        if self.server:
            rows.append({"role": "broker (redis-server)", "pid": self.server.pid,
                         "detail": f"{self.url}  from {self.server.source}"})
        else:
            rows.append({"role": "broker (external)", "pid": None, "detail": redact(self.url)})
        for w in self._workers:
            if w.alive:
                rows.append({"role": f"worker main {w.hostname}", "pid": w.pid,
                             "detail": f"pool={w.pool} queues={','.join(w.queues)}"})
                for child in w.children():
                    rows.append({"role": "  pool child", "pid": child, "detail": f"of {w.pid}"})
        return rows

    def health(self) -> bool:
        """Print what runs and what to fix; True when everything answers."""
        ok = True

        def line(good: bool, text: str, fix: str = "") -> None:
            nonlocal ok
            ok &= good
            print(("  ok   " if good else "  FIX  ") + text + ("" if good else f"\n       -> {fix}"))

        try:
            info = self.redis.info()
            line(True, f"broker {redact(self.url)} answers (Redis {info['redis_version']})")
            policy = self.redis.config_get("maxmemory-policy").get("maxmemory-policy", "?")
            line(policy == "noeviction", f"maxmemory-policy is {policy}",
                 "a broker must not evict queue lists: CONFIG SET maxmemory-policy noeviction")
        except (redis.RedisError, CourseError) as exc:
            line(False, f"broker {redact(self.url)} does not answer ({exc})",
                 "re-run the setup cell (celerylab.start(...)); `./course doctor` checks the machine")
        except Exception as exc:  # CONFIG may be disabled on a managed Redis
            line(True, f"broker answers; config not readable ({exc})")
        for w in self._workers:
            if not w.alive:
                continue
            replies = self.control.control.ping(destination=[w.hostname], timeout=2.0)
            line(bool(replies), f"worker {w.hostname} (pid {w.pid}) answers ping",
                 f"look at its log: stack.worker_log('{w.name}'), then restart it")
        if not any(w.alive for w in self._workers):
            print("  info no worker running (start one with stack.spawn_worker(...))")
        return ok

    def worker_log(self, name: str, lines: int = 40) -> None:
        for w in self._workers:
            if w.name == name:
                print(w.log_tail(lines))
                return
        print(f"no worker named {name!r} in this notebook")

    @contextmanager
    def scratch_redis(self, appendonly: bool = False, save: str | None = ""):
        """A throwaway redis-server of the course's own, for experiments that restart a broker.
        ``save=None`` keeps redis-server's default save points (RDB snapshots)."""
        server = RedisServer(self.rundir / "scratch", appendonly=appendonly, save=save)
        server.start(watchdog=self.watchdog)
        try:
            yield server
        finally:
            server.stop()


def start(namespace: str) -> Stack:
    """Start (or restart) this notebook's stack; re-running the cell replaces the old one."""
    global _current
    if _current is not None:
        _current.stop()
    _current = Stack(namespace).start()
    atexit.register(_current.stop)
    retire_task_modules(_current.url)
    _watch_the_broker()
    return _current


def remember_broker(url: str) -> None:
    """A broker of this kernel's besides a stack's own (chapter 9's spare, its Sentinel set):
    task modules bound to it are retired like a stack's when the notebook starts again."""
    _urls.add(url)


def retire_task_modules(url: str) -> list[str]:
    """Forget the task modules imported for an earlier stack of this kernel, so that the next
    ``import chNN_tasks`` reads the new broker URL instead of returning the module (and its
    Celery app) bound to a Redis that is gone. Returns their names."""
    retired = []
    for name, module in list(sys.modules.items()):
        apps = [v for v in list(vars(module).values()) if _app_of_earlier_stack(v, url)] \
            if module is not None else []
        if not apps:
            continue
        sys.modules.pop(name, None)
        forget_shared_tasks(name)
        for obj in (module, *apps):
            _retired[obj] = name
        for app in apps:
            drop_result_subscriptions(app)
        retired.append(name)
    return retired


def drop_result_subscriptions(app) -> None:
    """Forget the result subscriptions of an app whose Redis is gone, without a word to it.

    An AsyncResult unsubscribes when it is garbage-collected (``AsyncResult.__del__``). One of an
    earlier stack's, collected when a re-run cell assigns its variable again, would try the dead
    Redis: celery's result consumer reconnects for ~19 s, then prints "Retry limit exceeded"
    (measured: a 0.1 s cell of chapter 3 took 19 s on its second run)."""
    backend = getattr(app._local, "backend", None)  # celery caches it per thread
    consumer = getattr(backend, "result_consumer", None)
    if consumer is None or not hasattr(consumer, "subscribed_to"):
        return
    consumer.subscribed_to.clear()
    getattr(consumer, "_pending_unsubscribe", set()).clear()
    if getattr(consumer, "_pubsub", None) is not None:
        consumer._pubsub = None  # its socket closes when collected; nothing is sent


def _app_of_earlier_stack(value, url: str) -> bool:
    if not issubclass(type(value), Celery):  # type(): a proxy (celery.current_app) is not one
        return False
    try:  # its broker, or its result backend (a RabbitMQ app keeps its results in the Redis)
        used = {value.conf.broker_url, value.conf.result_backend}
    except Exception:
        return False
    return bool(used & _urls) and url not in used


def forget_shared_tasks(module_name: str) -> None:
    """``@app.task`` is shared by default: it also registers the task with every app finalized
    later (``celery._state.connect_on_app_finalize``). The app of a module imported again
    would then get the first import's tasks, registered first, and ignore the edited ones
    (celery/app/base.py, DuplicateTaskNameWarning). Forget the earlier import's."""
    from celery import _state

    def from_module(callback) -> bool:
        for cell in getattr(callback, "__closure__", None) or ():
            try:
                if getattr(cell.cell_contents, "__module__", None) == module_name:
                    return True
            except ValueError:  # an empty cell
                continue
        return False

    for callback in [cb for cb in _state._on_app_finalizers if from_module(cb)]:
        _state._on_app_finalizers.discard(callback)


def retired_module(value) -> str | None:
    """The task module ``value`` (a module, its Celery app, or one of its tasks) was imported
    from, if that import belongs to an earlier stack of this kernel; else None."""
    try:
        if value in _retired:
            return _retired[value]
        app = getattr(value, "app", None) if hasattr(value, "apply_async") else None
        return _retired.get(app) if app is not None else None
    except TypeError:  # not hashable, not weak-referenceable: not ours
        return None


def check_broker(names: tuple[str, ...] = ()) -> None:
    """Raise a clear error at once if this kernel's stack has lost its Redis (killed, crashed):
    otherwise the next Celery call would retry for about 20 s, then show a long traceback.
    ``names``: the globals the cell reads; one bound to a task module of an earlier stack is
    named, with the cell to run first."""
    check_names(names)
    problem = broker_problem(ping=False)
    if problem:
        raise CourseError(problem)


def broker_problem(ping: bool = True) -> str | None:
    """What is wrong with this kernel's broker, as the course says it (None: nothing found).
    Without ``ping``, only whether the course's own redis-server process is gone."""
    s = _current
    if s is None or s.stopped:
        return None
    if s.server is not None and s.server.group is not None and not s.server.group.alive:
        return (f"This notebook's Redis (pid {s.server.pid}) is gone: it was stopped or killed, "
                f"and with it every queue and result of the stack. Re-run the setup cell "
                f"(stack = celerylab.start({s.namespace!r})) to start a fresh one, then the cells "
                "that start workers.")
    if ping:
        try:
            redis.Redis.from_url(s.url, socket_timeout=1, socket_connect_timeout=1).ping()
        except (redis.RedisError, OSError):
            return (f"This notebook's Redis ({redact(s.url)}) does not answer. Start it again "
                    f"(or fix REDIS_URL), then re-run the setup cell "
                    f"(stack = celerylab.start({s.namespace!r})) and the cells that start workers.")
    return None


def _broker_errors() -> tuple[type[BaseException], ...]:
    from kombu.exceptions import OperationalError
    return (redis.ConnectionError, redis.TimeoutError, OperationalError, ConnectionError)


def _explain_broker_error(shell, etype, value, tb, tb_offset=None):
    """IPython's handler for connection errors: when the notebook's broker died, the course's
    message (what died, the cell to re-run) instead of a library's traceback."""
    problem = broker_problem()
    if problem is None:
        return shell.showtraceback((etype, value, tb), tb_offset=tb_offset)
    shell.showtraceback((CourseError, CourseError(problem), None))
    return None


def check_names(names, then: str = "this one") -> None:
    try:
        from IPython import get_ipython
        user_ns = get_ipython().user_ns
    except (ImportError, AttributeError):
        return
    for name in names:
        module = retired_module(user_ns.get(name))
        if module:
            raise CourseError(
                f"`{name}` comes from {module}.py as imported for this notebook's previous stack "
                f"(its Redis is gone): run the cell that imports {module} again, then {then}.")


def _watch_the_broker() -> None:
    """In IPython, run ``check_broker()`` before each cell (except the one restarting the stack):
    a notebook whose Redis died fails its next cell within a second, saying how to restart; and a
    connection error raised inside a cell (a course helper, a Celery call) while the broker is
    dead is shown as that message, not as a library's traceback."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    ip = get_ipython()
    if ip is None or any(isinstance(t, _BrokerWatch) for t in ip.ast_transformers):
        return
    ip.ast_transformers.append(_BrokerWatch())
    ip.set_custom_exc(_broker_errors(), _explain_broker_error)


class _BrokerWatch(ast.NodeTransformer):
    """Prepends ``check_broker()`` to a cell's code (IPython applies it to every cell)."""

    CHECK = "__import__('celerylab.stack', fromlist=['check_broker']).check_broker({names!r})"

    def visit_Module(self, node):
        if "celerylab.start(" in ast.unparse(node):
            return node  # the cell that (re)starts the stack must run
        read, bound = set(), set()
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                (read if isinstance(n.ctx, ast.Load) else bound).add(n.id)
            elif isinstance(n, ast.alias):
                bound.add((n.asname or n.name).split(".")[0])
            elif isinstance(n, ast.arg):
                bound.add(n.arg)
        names = tuple(sorted(read - bound))
        node.body[0:0] = ast.parse(self.CHECK.format(names=names)).body
        return ast.fix_missing_locations(node)


def live_task(task):
    """``task`` itself, or, when it was imported for an earlier stack of this kernel, the task of
    the same name from its module imported again (for the current stack)."""
    import importlib
    module = retired_module(task)
    if module is None:
        return task
    return getattr(importlib.import_module(module), task.name.rsplit(".", 1)[-1])


def current() -> Stack:
    if _current is None:
        raise CourseError("No stack is running in this kernel: run the setup cell first "
                          "(stack = celerylab.start(...)).")
    return _current
