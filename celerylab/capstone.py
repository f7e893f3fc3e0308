"""Chapter 8 and Lab 8: a checkout flow (order -> charge -> receipt), its chaos run, and a harness
for characterisation tests.

Given to the flow's task modules (they import it like any third-party client):

    PaymentAPI(db).charge(order_id, cents, idempotency_key=None)   the payment provider
    Mailer(db).send(order_id, email)                                the slow e-mail service
    CardDeclined, PaymentUnavailable, InvalidOrder                  their errors

Both keep what they did in Redis, where nothing in the flow can hide it: every charge is one entry
of the list ``shop:charges`` (an order id twice there is a double charge), every receipt one entry
of ``shop:receipts``. Faults are armed per order in ``shop:faults`` by the chaos run (or by the
harness): ``flaky`` (the API is unavailable for the first calls), ``down`` (it never answers),
``declined`` (a card that will never pay), ``oom`` (the process dies right after the charge, as
the OOM killer would), ``oom-before`` (it dies during the call, before the charge), ``hang`` (the call hangs right after the charge: the chaos run SIGKILLs
the whole worker then).

The flow's contract (what the chaos run and the checker rely on): a module ``<name>.py`` with
``app``, ``submit_order(order)`` (the producer), tasks ``place_order(order)`` and
``send_receipt(order_id, email)``, a paid order marked ``db.hset("shop:orders", id, "paid")``, and
optionally ``WORKERS`` (name -> {"queues": [...], "concurrency": n}) for its worker layout.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from celery import signals

from celerylab import recording
from celerylab.errors import CourseError
from celerylab.stack import forget_shared_tasks

CHARGES = "shop:charges"
RECEIPTS = "shop:receipts"
ORDERS = "shop:orders"
DEAD = "shop:dead"
FAULTS = "shop:faults"
FAULTS_LEFT = "shop:faults-left"
PROVIDER_KEYS = "shop:provider-idempotency"
HANGING = "shop:hanging"
CHARGE_SECONDS = 0.05  # one call to the payment provider
RECEIPT_SECONDS = 0.25  # one e-mail through a slow SMTP relay
SHIPPED_LAYOUT = {"shop": {"queues": ["celery"], "concurrency": 2}}  # one worker, the default queue
MAX_CHILDREN = 4  # the layout's budget: pool processes in all (this course runs on 2 cores)
MAX_WORKERS = 3


# --- the given services --------------------------------------------------------------------
class CardDeclined(Exception):
    """The bank refused the card: no later attempt will be accepted."""


class PaymentUnavailable(Exception):
    """The payment provider did not answer: worth trying again later."""


class InvalidOrder(ValueError):
    """An order that breaks the contract of the flow (raise it at the boundary)."""


class PaymentAPI:
    """The payment provider. ``charge`` takes the money and returns a charge id.

    Like real providers, it accepts an ``idempotency_key``: a second call with a key it has seen
    returns the first charge's id and charges nothing."""

    def __init__(self, db) -> None:
        self.db = db

    def charge(self, order_id: str, cents: int, idempotency_key: str | None = None) -> str:
        db = self.db
        fault = (db.hget(FAULTS, order_id) or b"").decode()
        time.sleep(CHARGE_SECONDS / 2)
        if fault == "declined":
            raise CardDeclined(f"card declined for order {order_id}")
        if fault == "down" or (fault == "flaky" and db.hincrby(FAULTS_LEFT, order_id, -1) >= 0):
            raise PaymentUnavailable(f"payment provider unavailable (order {order_id})")
        if fault == "oom-before" and db.hincrby(FAULTS_LEFT, order_id, -1) >= 0:
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-call, before the charge went through
        time.sleep(CHARGE_SECONDS / 2)
        charge_id = f"ch-{order_id}-{db.incr('shop:charge-seq')}"
        if idempotency_key is not None:
            key = str(idempotency_key)
            if not db.hsetnx(PROVIDER_KEYS, key, charge_id):
                return db.hget(PROVIDER_KEYS, key).decode()
        db.rpush(CHARGES, order_id)
        if fault in ("oom", "hang") and db.hincrby(FAULTS_LEFT, order_id, -1) >= 0:
            if fault == "oom":
                os.kill(os.getpid(), signal.SIGKILL)  # the kernel's OOM killer, right now
            db.rpush(HANGING, json.dumps({"order": order_id, "pid": os.getpid()}))
            time.sleep(60)  # a call that hangs, until the chaos run kills the whole worker
        return charge_id


class Mailer:
    """The e-mail service: slow, and it always delivers."""

    def __init__(self, db) -> None:
        self.db = db

    def send(self, order_id: str, email: str) -> None:
        time.sleep(RECEIPT_SECONDS)
        self.db.rpush(RECEIPTS, order_id)


def order(order_id: str, cents: int = 1250, email: str | None = None) -> dict:
    """A well-formed order."""
    return {"id": order_id, "total_cents": cents, "email": email or f"{order_id}@example.com"}


MALFORMED = {  # what a buggy client sends; the producer must refuse each one, at once
    "no total": {"id": "bad-no-total", "email": "a@example.com"},
    "total as text": {"id": "bad-text-total", "total_cents": "12.50", "email": "b@example.com"},
    "negative total": {"id": "bad-negative", "total_cents": -100, "email": "c@example.com"},
    "no e-mail": {"id": "bad-no-email", "total_cents": 990},
    "not an order": ["bad-list", 990, "d@example.com"],
}
UNUSUAL_BUT_VALID = {"id": "odd-01", "total_cents": 1, "email": "x+tag@example.co.uk",
                     "coupon": None}  # one cent, an extra field: the producer must accept it


# --- the flow under test ---------------------------------------------------------------------
class FlowError(CourseError):
    """The flow's module does not import, or does not have the parts the chaos run needs."""


def load_flow(name: str):
    """Import (again) the flow's task module from the notebook's folder."""
    folder = os.getcwd()
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules.pop(name, None)
    forget_shared_tasks(name)
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(name)
    except NotImplementedError:
        raise FlowError(f"{name}.py still has a `raise NotImplementedError` line: write your code "
                        "there, re-run its %%writefile cell, then this cell.") from None
    except Exception as exc:
        raise FlowError(f"{name}.py does not import: {type(exc).__name__}: {exc}\n"
                        "Fix it, re-run its %%writefile cell, then this cell.") from None
    missing = [part for part in ("app", "submit_order", "place_order", "send_receipt")
               if not hasattr(module, part)]
    if missing:
        raise FlowError(f"{name}.py has no {', '.join(missing)}: the flow needs `app`, "
                        "`submit_order(order)`, and the tasks `place_order(order)` and "
                        "`send_receipt(order_id, email)`.")
    return module


def layout_of(module) -> dict:
    """The flow's workers: its ``WORKERS``, or the shipped one-worker layout."""
    layout = getattr(module, "WORKERS", None) or SHIPPED_LAYOUT
    if not isinstance(layout, dict):
        raise FlowError("WORKERS must be a dict: worker name -> {'queues': [...], 'concurrency': n}.")
    for name, spec in layout.items():
        if not isinstance(spec, dict) or not spec.get("queues") or \
                not isinstance(spec.get("concurrency"), int) or spec["concurrency"] < 1:
            raise FlowError(f"WORKERS[{name!r}] must be {{'queues': [...], 'concurrency': n}} "
                            f"with n >= 1, not {spec!r}.")
    children = sum(spec["concurrency"] for spec in layout.values())
    if children > MAX_CHILDREN or len(layout) > MAX_WORKERS:
        raise FlowError(f"WORKERS asks for {len(layout)} workers and {children} pool processes; "
                        f"the budget is {MAX_WORKERS} workers and {MAX_CHILDREN} processes in all "
                        "(this machine has 2 cores): isolate the work, do not just add processes.")
    return layout


def route_of(module, task: str) -> str:
    """The queue the flow's own app sends ``task`` to (its routes, or its default queue)."""
    name = f"{module.__name__}.{task}"
    module.app.finalize(auto=True)
    own = module.app.tasks.get(name)  # @app.task(queue=...) counts, as Celery's router sees it
    route = module.app.amqp.router.route(own._get_exec_options() if own else {}, name)
    queue = route.get("queue")
    return getattr(queue, "name", None) or str(queue or module.app.conf.task_default_queue)


def start_flow_workers(stack, module) -> dict:
    """Boot the layout's workers (in parallel); returns name -> Worker."""
    stack.stop_workers()
    multiplier = module.app.conf.worker_prefetch_multiplier
    workers = {name: stack.worker(module.__name__, name=name, queues=spec["queues"],
                                  concurrency=spec["concurrency"],
                                  prefetch_multiplier=spec.get("prefetch_multiplier", multiplier))
               for name, spec in layout_of(module).items()}
    stack.start_workers(*workers.values())
    return workers


def stop_flow_workers(stack) -> None:
    """The run is over and measured: SIGKILL the workers (a warm stop would only add a second)."""
    for w in list(stack._workers):
        w.kill()
    stack.stop_workers(timeout=5)


def age_unacked(r, task_ids) -> int:
    """Make the broker hand back now the unacknowledged messages of ``task_ids``, as if the
    visibility timeout had passed (their fetch times set to 0); the restore sweep a worker runs
    at start then requeues them. ``unacked_mutex`` is cleared: a dead worker may hold it."""
    aged = {}
    for tag, raw in r.hgetall("unacked").items():
        try:
            msg = json.loads(raw)
            msg = msg[0] if isinstance(msg, list) else msg
            if str(msg["headers"]["id"]) in task_ids:
                aged[tag] = 0
        except (ValueError, KeyError, TypeError, IndexError):
            continue
    if aged:
        r.zadd("unacked_index", aged, xx=True)
    r.delete("unacked_mutex")
    return len(aged)


class Publications:
    """While active, maps each order id to the task ids of the ``place_order`` messages the
    notebook publishes for it (from Celery's ``before_task_publish`` signal)."""

    def __init__(self, module) -> None:
        self.task = f"{module.__name__}.place_order"
        self.ids: dict[str, list[str]] = {}

    def __enter__(self):
        signals.before_task_publish.connect(self._seen, weak=False)
        return self

    def __exit__(self, *exc) -> None:
        signals.before_task_publish.disconnect(self._seen)

    def _seen(self, sender=None, body=None, headers=None, **_):
        if sender != self.task or not headers:
            return
        try:
            args, kwargs = body[0], body[1]
            first = args[0] if args else kwargs.get("order", next(iter(kwargs.values()), None))
            oid = first.get("id") if isinstance(first, dict) else first
        except (TypeError, IndexError, AttributeError, StopIteration):
            return
        self.ids.setdefault(str(oid), []).append(headers["id"])


def _outstanding(r, queues) -> int:
    return sum(r.llen(q) for q in queues) + r.hlen("unacked")


def settle(stack, queues, quiet: float = 0.6, timeout: float = 30.0) -> bool:
    """Wait until no message of the flow waits or is held by a worker, and nothing new was
    recorded for ``quiet`` seconds. False if that did not happen within ``timeout``."""
    r = stack.redis
    deadline = time.monotonic() + timeout
    seen, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        events = r.llen(recording.EVENTS)
        if events != seen or _outstanding(r, queues):
            seen, since = events, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return True
        time.sleep(0.05)
    if os.environ.get("CELERYLAB_DEBUG"):
        print("unsettled:", {q: r.llen(q) for q in queues}, r.hgetall("unacked"))
    return False


def _count(r, key: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for raw in r.lrange(key, 0, -1):
        out[raw.decode()] = out.get(raw.decode(), 0) + 1
    return out


def dead_letters(r) -> list:
    """The flow's dead letters (``shop:dead``), oldest first, parsed when they are JSON."""
    out = []
    for raw in reversed(r.lrange(DEAD, 0, -1)):
        try:
            out.append(json.loads(raw))
        except ValueError:
            out.append(raw.decode(errors="replace"))
    return out


# --- the harness for characterisation tests -------------------------------------------------
class Shop:
    """What a characterisation test drives: the flow's real workers on this notebook's Redis.

    Every ``place*`` call submits one order through the flow's producer, makes its incident
    happen, waits until the flow has settled and returns the order id. With ``faults=False`` the
    same calls make nothing go wrong (the checker runs your tests that way too: a test that still
    passes then is not reproducing an incident)."""

    def __init__(self, stack, module: str = "shop_v1", faults: bool = True) -> None:
        self.stack, self.faults, self.r = stack, faults, stack.redis
        self.module = load_flow(module)
        self.queues = sorted({q for spec in layout_of(self.module).values() for q in spec["queues"]})
        self.workers: dict = {}
        self.rejected: dict[str, str] = {}
        self._n = 0

    def start(self) -> Shop:
        """Empty the notebook's Redis and boot the flow's workers."""
        self.stack.reset()
        self.workers = start_flow_workers(self.stack, self.module)
        return self

    def calm(self) -> Shop:
        """The same flow and workers, with no fault injected from now on."""
        other = Shop.__new__(Shop)
        other.__dict__.update(self.__dict__, faults=False, rejected={})
        return other

    def _id(self, kind: str) -> str:
        self._n += 1
        return f"{kind}-{self._n:02d}"

    def _submit(self, o, fault: str | None = None, times: int = 1) -> str:
        oid = o["id"] if isinstance(o, dict) else str(o[0])
        if fault and self.faults:
            self.r.hset(FAULTS, oid, fault)
            self.r.hset(FAULTS_LEFT, oid, times)
        try:
            self.module.submit_order(o)
        except Exception as exc:  # a producer that validates refuses it
            self.rejected[oid] = f"{type(exc).__name__}: {exc}"
        return oid

    def _settle(self) -> None:
        if not settle(self.stack, self.queues, quiet=0.4, timeout=20):
            raise CourseError("The flow did not settle within 20 s (messages still waiting or "
                              "held): stack.health() and stack.worker_log(name) show why.")

    def place(self) -> str:
        """An ordinary order."""
        oid = self._submit(order(self._id("order")))
        self._settle()
        return oid

    def place_with_flaky_payments(self, failures: int = 2) -> str:
        """The payment provider is unavailable for the order's first ``failures`` calls."""
        oid = self._submit(order(self._id("flaky")), "flaky", failures)
        self._settle()
        return oid

    def place_with_declined_card(self) -> str:
        """The bank declines the card, every time."""
        oid = self._submit(order(self._id("declined")), "declined")
        self._settle()
        return oid

    def place_malformed(self) -> str:
        """An order without a total (a buggy client). Without faults: a well-formed one."""
        o = order(self._id("malformed"))
        if self.faults:
            del o["total_cents"]
        oid = self._submit(o)
        self._settle()
        return oid

    def place_while_child_oom_killed(self) -> str:
        """The pool process running the order is SIGKILLed right after the charge went through."""
        oid = self._submit(order(self._id("oom")), "oom")
        self._settle()
        return oid

    def place_while_worker_crashes(self) -> str:
        """The whole worker running the order is SIGKILLed right after the charge went through;
        its unacknowledged messages are aged past the visibility timeout and the worker is
        started again: its restore sweep at start puts them back on their queue."""
        oid = self._submit(order(self._id("crash")), "hang")
        if self.faults:
            crash_worker_running(self.stack, self.workers, oid, timeout=10)
        self._settle()
        return oid

    # what a test reads
    def charges(self, order_id: str) -> int:
        """How many times the order was charged."""
        return _count(self.r, CHARGES).get(order_id, 0)

    def paid(self, order_id: str) -> bool:
        """Whether the flow marked the order paid."""
        return self.r.hget(ORDERS, order_id) == b"paid"

    def receipts(self, order_id: str) -> int:
        return _count(self.r, RECEIPTS).get(order_id, 0)

    def dead_letters(self) -> list:
        return dead_letters(self.r)

    def refused(self, order_id: str) -> bool:
        """Whether the producer refused the order (raised) instead of sending it."""
        return order_id in self.rejected


def crash_worker_running(stack, workers: dict, order_id: str, timeout: float = 10.0) -> str:
    """Wait until ``order_id`` hangs right after its charge, SIGKILL the whole worker running it,
    hand its messages back (visibility timeout fast-forwarded) and start it again. Returns the
    worker's name."""
    r = stack.redis
    deadline = time.monotonic() + timeout
    pid = None
    while pid is None:
        for raw in r.lrange(HANGING, 0, -1):
            info = json.loads(raw)
            if info["order"] == order_id:
                pid = info["pid"]
        if pid is None:
            if time.monotonic() > deadline:
                raise CourseError(f"Order {order_id} never reached the payment provider within "
                                  f"{timeout:.0f} s: is a worker consuming its queue? "
                                  "(stack.health(), stack.worker_log(name))")
            time.sleep(0.02)
    name, victim = next(((n, w) for n, w in workers.items() if pid in w.children() or pid == w.pid),
                        (None, None))
    if victim is None:
        raise CourseError(f"The process {pid} running {order_id} belongs to no worker of the flow.")
    held = {a.id for a in stack.records() if a.host == victim.hostname and a.state is None}
    victim.kill()
    age_unacked(r, held)
    victim.start()
    return name


# --- the chaos run ---------------------------------------------------------------------------
@dataclass
class ChaosReport:
    """What one chaos run did to the flow, measured."""

    module: str
    layout: dict
    checkout_queue: str
    valid: list = field(default_factory=list)  # orders the producer accepted and that can pay
    poison: dict = field(default_factory=dict)  # order id -> the error it must be dead-lettered with
    burst: list = field(default_factory=list)  # ordinary orders of the burst (checkout p95)
    quiet: list = field(default_factory=list)  # ordinary orders sent one at a time (the baseline)
    crashed: dict = field(default_factory=dict)  # order id -> what was done to its process
    refused: dict = field(default_factory=dict)  # malformed order name -> the producer's error
    accepted_malformed: list = field(default_factory=list)  # malformed orders the producer sent
    silently_dropped: list = field(default_factory=list)  # neither sent nor refused (no exception)
    unusual_refused: str | None = None  # the producer's error for a valid but unusual order
    charges: dict = field(default_factory=dict)
    receipts: dict = field(default_factory=dict)
    paid: set = field(default_factory=set)
    letters: list = field(default_factory=list)
    latency: dict = field(default_factory=dict)  # order id -> seconds from publish to paid
    receipt_runtime: float | None = None  # median seconds one receipt task ran (measured)
    retry_waits: list = field(default_factory=list)  # seconds each retry waited (publish to start)
    attempts: dict = field(default_factory=dict)  # order id -> attempts of its place_order
    samples: list = field(default_factory=list)  # the course's lag readings (truth), all queues
    stall: tuple | None = None  # (freeze, thaw) times
    burst_window: tuple | None = None  # (first order sent, last burst order paid) times
    drained_at: float | None = None  # when the checkout queue was empty again after the thaw
    crash_at: float | None = None  # when the crash phase began (a restarted worker may page)
    alert: dict | None = None  # the alert's rule, and its readings: [(t, firing)]
    alert_log: list = field(default_factory=list)
    settled: bool = True
    t0: float = 0.0
    seconds: float = 0.0

    # -- derived figures
    def longest_gap(self, window) -> float:
        """The longest time between two of the sampler's readings (one every 0.25 s) within
        ``window``: how long this process could not run, a same-run measure of the load."""
        times = sorted({s.t for s in self.samples if window[0] <= s.t <= window[1]})
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)

    def p95(self, ids) -> float | None:
        values = [self.latency[i] for i in ids if i in self.latency]
        return recording.percentile(values, 95) if len(values) >= 3 else None

    @property
    def double_charged(self) -> list:
        return sorted(o for o, n in self.charges.items() if n > 1)

    @property
    def lost(self) -> list:
        """Valid orders never charged, or charged but never marked paid."""
        return sorted(o for o in self.valid if o not in self.paid or not self.charges.get(o))

    @property
    def no_receipt(self) -> list:
        return sorted(o for o in self.valid if o in self.paid and not self.receipts.get(o))

    def letter_for(self, order_id: str):
        return next((x for x in self.letters if order_id in json.dumps(x)), None)

    @property
    def unnoticed_poison(self) -> list:
        return sorted(o for o in self.poison if self.letter_for(o) is None)

    @property
    def letters_for_paid(self) -> list:
        return sorted(o for o in self.paid if self.letter_for(o) is not None)

    def fired(self, start: float, end: float) -> bool:
        return any(f for t, f in self.alert_log if start <= t <= end)

    def incidents(self) -> list[str]:
        out = []
        if self.lost:
            out.append(f"lost orders: {', '.join(self.lost)}")
        if self.double_charged:
            out.append(f"double charges: {', '.join(f'{o} x{self.charges[o]}' for o in self.double_charged)}")
        if self.unnoticed_poison:
            out.append(f"poison orders failed silently (no dead letter): {', '.join(self.unnoticed_poison)}")
        if self.accepted_malformed:
            out.append(f"malformed orders accepted by the producer: {', '.join(self.accepted_malformed)}")
        if self.no_receipt:
            out.append(f"paid orders without a receipt: {', '.join(self.no_receipt)}")
        quiet, burst = self.p95(self.quiet), self.p95(self.burst)
        if quiet and burst and burst > 3 * quiet + 0.5 * (self.receipt_runtime or RECEIPT_SECONDS):
            out.append(f"checkout p95 {burst:.2f} s during the burst vs {quiet:.2f} s when quiet")
        if self.alert is None:
            peak = max((s.oldest_age or 0 for s in self.samples
                        if s.queue == self.checkout_queue and self.stall
                        and self.stall[0] <= s.t <= self.stall[1] + 1), default=0)
            out.append(f"the checkout queue stalled (its oldest order waited {peak:.1f} s) and "
                       "no alert fired: nobody noticed")
        return out

    def show(self) -> None:
        print(f"chaos run on {self.module} ({self.seconds:.1f} s), workers: "
              + ", ".join(f"{n} -Q {','.join(s['queues'])} -c {s['concurrency']}"
                          for n, s in self.layout.items()))
        print(f"  {len(self.valid)} valid orders: {len(self.paid & set(self.valid))} paid, "
              f"{sum(self.charges.get(o, 0) for o in self.valid)} charges, "
              f"{len(self.poison)} poison orders, {len(self.letters)} dead letters")
        quiet, burst = self.p95(self.quiet), self.p95(self.burst)
        if quiet and burst:
            print(f"  checkout p95: {quiet:.2f} s quiet, {burst:.2f} s during the burst")
        found = self.incidents()
        for line in found:
            print(f"  INCIDENT  {line}")
        if not found:
            print("  no incident")

    def plot(self):
        """Checkout latency per order, and each queue's lag, over the run."""
        import matplotlib.pyplot as plt
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.2), sharex=True)
        sent = {}
        for a in self.attempts.values():
            if a and a[0].sent:
                sent[a[0].id] = a[0].sent
        colours = {"double charged": "tab:red", "lost": "black", "paid": "tab:blue"}
        for oid, secs in sorted(self.latency.items()):
            first = self.attempts.get(oid) or []
            if not first or not first[0].sent:
                continue
            kind = ("double charged" if oid in self.double_charged else "paid")
            top.scatter(first[0].sent - self.t0, secs, s=14, color=colours[kind], label=kind)
        for oid in self.lost:
            first = self.attempts.get(oid) or []
            if first and first[0].sent:
                top.scatter(first[0].sent - self.t0, 0, marker="x", color="black", label="lost")
        handles = dict(zip(*reversed(top.get_legend_handles_labels()), strict=True))
        top.legend(handles.values(), handles.keys(), fontsize=8, loc="upper left")
        top.set_ylabel("publish -> paid (s)")
        top.set_title(f"{self.module}: checkout latency by order, and queue lag")
        for queue in sorted({s.queue for s in self.samples}):
            series = [s for s in self.samples if s.queue == queue]
            bottom.plot([s.t - self.t0 for s in series], [s.oldest_age or 0 for s in series],
                        label=f"{queue}: oldest waiting (s)")
        if self.stall:
            for ax in (top, bottom):
                ax.axvspan(self.stall[0] - self.t0, self.stall[1] - self.t0, color="0.88",
                           label="_stall", zorder=0)
            bottom.text(self.stall[0] - self.t0, bottom.get_ylim()[1] * 0.9, " stall", fontsize=8)
        firing = [t - self.t0 for t, f in self.alert_log if f]
        if firing:
            bottom.scatter(firing, [0] * len(firing), marker="|", color="tab:red", s=120,
                           label="alert firing")
        bottom.set_xlabel("seconds into the run")
        bottom.set_ylabel("lag (s)")
        bottom.legend(fontsize=8, loc="upper left")
        from celerylab.plots import tidy
        tidy(fig)
        return fig


def _wait_paid(r, oid: str, timeout: float = 10.0, receipt: bool = False) -> None:
    """Until the order is paid (and, with ``receipt``, its receipt sent), or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if r.hget(ORDERS, oid) == b"paid" and (not receipt or oid.encode() in r.lrange(RECEIPTS, -5, -1)):
            return
        time.sleep(0.01)


def _wait_decided(stack, task_ids, timeout: float = 10.0) -> None:
    """Until the last attempt of these tasks has ended (whatever its state), or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = stack.records(task_ids)
        if runs and runs[-1].state is not None:
            return
        time.sleep(0.05)


PHASES = ("baseline", "validation", "burst", "stall", "crash")


def chaos_run(stack, module_name: str, watch: dict | None = None, phases=PHASES,
              verbose: bool = True, quiet_orders: int = 4) -> ChaosReport:
    """Run the flow's real workers through the incidents, measure what happened.

    ``watch`` (optional) is the flow's monitoring: ``{"queues": [...], "alert": {"queue": q,
    "above": s, "for_seconds": s}}``; its alert is evaluated live on the course's readings.

    Phases: baseline (orders one at a time), validation (malformed orders through the producer),
    burst (ordinary orders at 10/s with a flaky provider, a declined card, a provider that stays
    down, and a malformed message from a legacy client), stall (every worker of the checkout
    queue frozen for 4 s while orders keep coming), crash (a pool process OOM-killed, and a whole
    worker SIGKILLed, each right after a charge). Then it waits until the flow has settled."""
    from celerylab.observe import LagAlert, Sampler

    say = print if verbose else (lambda *a, **k: None)
    module = load_flow(module_name)
    layout = layout_of(module)
    r = stack.redis
    checkout = route_of(module, "place_order")
    queues = sorted({q for spec in layout.values() for q in spec["queues"]}
                    | {checkout, route_of(module, "send_receipt")})
    report = ChaosReport(module_name, layout, checkout)
    stack.reset()
    t_boot = time.monotonic()
    workers = start_flow_workers(stack, module)
    say(f"workers up in {time.monotonic() - t_boot:.1f} s: "
        + ", ".join(f"{n} (-Q {','.join(s['queues'])})" for n, s in layout.items()))
    rule = None
    if watch:
        spec = watch.get("alert") or {}
        rule = LagAlert(above=float(spec["above"]), for_seconds=float(spec["for_seconds"]))
        report.alert = dict(spec)
    alert_queue = (report.alert or {}).get("queue")

    def on_sample(batch):
        for s in batch:
            if rule is not None and s.queue == alert_queue:
                report.alert_log.append((s.t, rule.check(s)))

    sampled = sorted(set(queues) | ({alert_queue} if alert_queue else set()))
    sampler = Sampler(r, sampled, interval=0.25, on_sample=on_sample)
    report.t0 = time.time()
    n = {"i": 0}

    def new_id(kind):
        n["i"] += 1
        return f"{kind}-{n['i']:02d}"

    def submit(o, fault=None, times=1, valid=True):
        oid = o["id"] if isinstance(o, dict) else None
        if fault:
            r.hset(FAULTS, oid, fault)
            r.hset(FAULTS_LEFT, oid, times)
        try:
            module.submit_order(o)
        except Exception as exc:
            if valid:
                raise FlowError(f"submit_order refused a well-formed order {o!r}: "
                                f"{type(exc).__name__}: {exc}") from None
            return f"{type(exc).__name__}: {exc}"
        return None

    publications = Publications(module)
    with publications, sampler:
        if "baseline" in phases:
            for _ in range(quiet_orders):
                oid = new_id("quiet")
                submit(order(oid))
                report.valid.append(oid)
                report.quiet.append(oid)
                _wait_paid(r, oid, receipt=True)  # the flow is idle again: a clean baseline
            say(f"baseline: {len(report.quiet)} orders, one at a time")
        if "validation" in phases:
            for name, bad in MALFORMED.items():
                depth = _outstanding(r, queues)
                before = len(publications.ids)
                error = submit(bad, valid=False)
                if len(publications.ids) > before or _outstanding(r, queues) > depth:
                    report.accepted_malformed.append(name)
                elif error is None:
                    report.silently_dropped.append(name)
                else:
                    report.refused[name] = error
            try:
                module.submit_order(dict(UNUSUAL_BUT_VALID))
                report.valid.append(UNUSUAL_BUT_VALID["id"])
            except Exception as exc:
                report.unusual_refused = f"{type(exc).__name__}: {exc}"
            say(f"validation: {len(report.refused)} of {len(MALFORMED)} malformed orders refused "
                "by the producer")
        if "burst" in phases:
            burst_start = time.time()
            faults = {3: ("flaky", 2), 7: ("declined", 1), 9: ("flaky", 1), 12: ("down", 1)}
            for i in range(20):
                fault, times = faults.get(i, (None, 1))
                oid = new_id(fault or "burst")
                submit(order(oid), fault, times)
                if fault in ("declined", "down"):
                    report.poison[oid] = {"declined": "CardDeclined",
                                          "down": "PaymentUnavailable"}[fault]
                else:
                    report.valid.append(oid)
                    if fault is None:
                        report.burst.append(oid)
                if i == 15:  # a legacy client publishes straight to the task, unvalidated
                    legacy = {"id": new_id("legacy"), "email": "legacy@example.com"}
                    module.place_order.apply_async(args=[legacy])  # routed as the flow routes it
                    report.poison[legacy["id"]] = ""
                time.sleep(0.1)
            for oid in report.burst:
                _wait_paid(r, oid, timeout=8)
            report.burst_window = (burst_start, time.time())
            say("burst: 20 orders at 10/s (2 flaky, 1 declined, 1 provider down) and one "
                "malformed message from a legacy client")
        if "stall" in phases:
            frozen = [w for w in workers.values() if checkout in w.queues]
            for w in frozen:
                os.killpg(w.pid, signal.SIGSTOP)  # main process and pool children: hung
            freeze = time.time()
            for _ in range(8):
                oid = new_id("stall")
                submit(order(oid))
                report.valid.append(oid)
                time.sleep(0.5)
            for w in frozen:
                os.killpg(w.pid, signal.SIGCONT)
            report.stall = (freeze, time.time())
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                if r.llen(checkout) == 0 and report.drained_at is None:
                    report.drained_at = time.time()
                firing = report.alert_log[-1][1] if report.alert_log else False
                if report.drained_at and (not firing or time.time() - report.drained_at > 3):
                    break
                time.sleep(0.05)
            say(f"stall: the checkout worker{'s' if len(frozen) > 1 else ''} frozen for "
                f"{report.stall[1] - freeze:.1f} s while 8 orders came in")
        if "crash" in phases:
            report.crash_at = time.time()
            oom, before = new_id("oom"), new_id("precharge")
            submit(order(oom), "oom")
            submit(order(before), "oom-before")
            report.valid += [oom, before]
            report.crashed[oom] = "its pool process was SIGKILLed right after the charge"
            report.crashed[before] = ("its pool process was SIGKILLed during the provider's call, "
                                      "before the charge went through")
            for oid in (oom, before):  # the worker has decided their fate: before the next crash
                _wait_paid(r, oid, timeout=0.5)
                _wait_decided(stack, publications.ids.get(oid, []))
            crash = new_id("crash")
            submit(order(crash), "hang")
            report.valid.append(crash)
            name = crash_worker_running(stack, workers, crash)
            report.crashed[crash] = f"its whole worker ({name}) was SIGKILLed right after the charge"
            say(f"crash: pool processes OOM-killed ({oom}, {before}), the whole worker {name} SIGKILLed "
                f"({crash}) and restarted")
        report.settled = settle(stack, queues, quiet=0.8, timeout=30)
        say("settled" if report.settled else "not settled after 30 s: still messages in flight")
    stop_flow_workers(stack)
    report.seconds = time.time() - report.t0
    report.samples = list(sampler.samples)
    report.charges = _count(r, CHARGES)
    report.receipts = _count(r, RECEIPTS)
    report.paid = {k.decode() for k, v in r.hgetall(ORDERS).items() if v == b"paid"}
    report.letters = dead_letters(r)
    ids = {tid: oid for oid, tids in publications.ids.items() for tid in tids}
    runs = stack.records(list(ids))
    for a in runs:
        report.attempts.setdefault(ids[a.id], []).append(a)
        if a.retries and a.wait is not None:
            report.retry_waits.append(a.wait)
    for oid, tries in report.attempts.items():
        done = [a.finished for a in tries if a.state == "SUCCESS" and a.finished]
        first = tries[0].sent
        if done and first:
            report.latency[oid] = min(done) - first
    receipt_times = [a.runtime for a in stack.records()
                     if a.name.endswith(".send_receipt") and a.runtime]
    if receipt_times:
        report.receipt_runtime = recording.percentile(receipt_times, 50)
    return report
