"""Lab 8 (the capstone) checkers: the checkout flow made reliable, step by step, then the chaos run
replayed on it.

    check_lab08_tests(tests, stack)          step 1: characterisation tests reproduce the incidents
    check_lab08_contracts(stack)             step 2: explicit settings, validation, retries, dead
                                             letters, routes (static, then a burst on the live flow)
    check_lab08_observability(watch, stack)  step 3: the lag alert, live on a stall
    check_lab08_note(note, stack)            step 4: the architecture note is filled in
    check_lab08(watch, note, stack)          the final check: the whole chaos run, replayed

Step 1 runs each test twice on the shipped flow (``shop_v1``): with the faults (it must pass: it
reproduces the incident) and without them (it must fail: a test that passes when nothing goes
wrong cannot catch anything). Timing verdicts are relative: checkout p95 during the burst is
judged against the same checkouts sent one at a time on an idle flow, in the same run, and the
time one receipt takes (also measured in the run).
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from celerylab import capstone
from celerylab.capstone import CardDeclined, InvalidOrder, PaymentUnavailable
from celerylab.checks.common import LabCheckFailed, MachineTooBusy, checker, ok

FLAWED = "shop_v1"
FLOW = "shop_tasks"
INCIDENTS = {
    "double_charge": "an order charged twice",
    "lost_order": "an order lost (never charged, or charged and never marked paid)",
    "silent_poison": "a poison order that fails with nobody told (no dead letter)",
}
# each default the flow relies on, and the names that write it out (a Celery setting, or the same
# option on the task's decorator)
EXPLICIT = {
    "when a message is acknowledged": ({"task_acks_late"}, {"acks_late"}),
    "what happens to a task whose process died": (
        {"task_reject_on_worker_lost", "task_retry_on_worker_lost"},
        {"reject_on_worker_lost", "retry_on_worker_lost"}),
    "how many messages a worker reserves": ({"worker_prefetch_multiplier"}, set()),
    "the serializers": ({"task_serializer", "result_serializer", "accept_content"}, set()),
    "how long results are kept": ({"result_expires"}, set()),
    "where each task goes": ({"task_routes", "task_queues", "task_default_queue"}, {"queue"}),
}
# what a test for each incident must do on the shipped flow: make it happen (one of these calls)
# and read what shows it (one of these)
INCIDENT_CALLS = {
    "double_charge": ({"place_while_worker_crashes"}, {"charges"}),
    "lost_order": ({"place_with_flaky_payments", "place_while_child_oom_killed"},
                   {"paid", "charges"}),
    "silent_poison": ({"place_with_declined_card", "place_malformed"}, {"dead_letters"}),
}
NOTE_SECTIONS = ("Defaults we chose", "Failures we expect", "Debugging the common incidents")
FAILURE_WORDS = {
    "a worker crash": ("crash", "sigkill", "kill", "dies", "died"),
    "the OOM killer": ("oom", "memory"),
    "the payment provider failing": ("payment", "provider"),
    "a burst of orders": ("burst", "spike", "peak", "load"),
    "malformed or poison orders": ("malformed", "poison", "invalid"),
}
MIN_WORDS = 25


# --- step 1 ----------------------------------------------------------------------------------
def _run_test(fn, shop, name: str) -> str | None:
    """None if the test passed, else what went wrong (an assertion's message, or an error)."""
    try:
        fn(shop)
    except NotImplementedError:
        raise LabCheckFailed(f"The test for {name} is not written yet: replace its "
                             "`raise NotImplementedError` line, run that cell, then this check.") \
            from None
    except AssertionError as exc:
        return f"its assertion failed{': ' + str(exc) if str(exc) else ''}"
    except LabCheckFailed:
        raise
    except Exception as exc:
        raise LabCheckFailed(f"The test for {name} raised {type(exc).__name__}: {exc}. A test "
                             "should only drive `shop` and assert on what it reads.") from None
    return None


class _Watched:
    """The harness, noting which of its calls a test makes."""

    def __init__(self, shop) -> None:
        self._shop, self.used = shop, set()

    def __getattr__(self, name):
        attr = getattr(self._shop, name)
        if callable(attr):
            self.used.add(name)
        return attr


def _check_calls(name: str, used: set) -> None:
    makes, reads = INCIDENT_CALLS[name]
    if not used & makes:
        did = ", ".join(sorted(u for u in used if u.startswith("place"))) or "no place call"
        raise LabCheckFailed(
            f"Your test for {INCIDENTS[name]} passes, but on the shipped flow none of the calls "
            f"it makes ({did}) leads to that incident: it reproduces another one. Which of the "
            "harness's incidents ends that way on shop_v1?")
    if not used & reads:
        raise LabCheckFailed(
            f"Your test for {INCIDENTS[name]} never reads what would show it: what would you "
            "look at to see that incident?")


@checker
def check_lab08_tests(tests, stack) -> None:
    """Step 1: each characterisation test reproduces its incident on the shipped flow."""
    if not isinstance(tests, dict) or set(tests) != set(INCIDENTS) or \
            not all(callable(f) for f in tests.values()):
        raise LabCheckFailed(f"TESTS must be a dict with the keys {sorted(INCIDENTS)}, each a "
                             "function taking `shop`.")
    for name, fn in tests.items():
        if len(inspect.signature(fn).parameters) != 1:
            raise LabCheckFailed(f"TESTS[{name!r}] must take one argument: `shop`.")
    try:
        shop = capstone.Shop(stack, FLAWED).start()
        for name, fn in tests.items():
            watched = _Watched(shop)
            failed = _run_test(fn, watched, name)
            if failed:
                raise LabCheckFailed(
                    f"On the shipped flow (shop_v1), your test for {INCIDENTS[name]} failed: "
                    f"{failed}. A characterisation test pins what the flow does today, incident "
                    "included: make the incident happen through `shop`, then assert what you "
                    "saw happen.")
            _check_calls(name, watched.used)
            ok(f"{name}: passes on the shipped flow (the incident happened)")
        calm = shop.calm()
        for name, fn in tests.items():
            if _run_test(fn, calm, name) is None:
                raise LabCheckFailed(
                    f"Your test for {INCIDENTS[name]} also passes when nothing goes wrong (the "
                    "same calls, with no fault injected): it would pass whatever the flow does, "
                    "so it cannot tell you when the incident is gone. Assert on the incident "
                    "itself.")
            ok(f"{name}: fails when no fault is injected (it tests the incident)")
    finally:
        capstone.stop_flow_workers(stack)
    print("Step 1 passed: your tests reproduce the three incidents on the shipped flow.")


# --- step 2 ----------------------------------------------------------------------------------
def _decorator_options(module) -> set[str]:
    """Keyword names given to the ``@app.task(...)`` decorators of the flow's module."""
    try:
        tree = ast.parse(Path(module.__file__).read_text())
    except (OSError, SyntaxError):
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call):
                    names |= {k.arg for k in dec.keywords if k.arg}
    return names


def changed_settings(module) -> set[str]:
    """The Celery settings the module sets: ``app.conf.update`` / assignments (``conf.changes``,
    read once the app is finalized: before that, a pending configuration lists every setting)
    and ``app.config_from_object`` (the other maps of the configuration, the defaults aside)."""
    from celery.app.defaults import DEFAULTS
    module.app.finalize(auto=True)
    conf = module.app.conf
    names = set(conf.changes)
    for source in conf.maps[1:-1]:  # the last map is Celery's defaults
        obj = getattr(source, "obj", None)  # config_from_object's object, read as attributes
        names |= set(source) if isinstance(source, dict) else set(dir(obj))
    return {k for k in names if k in DEFAULTS} - {"broker_url", "result_backend", "deprecated_settings"}


def explicit_settings(module) -> set[str]:
    """What the module writes out: settings it changed, and its tasks' decorator options."""
    return changed_settings(module) | _decorator_options(module)


def _check_explicit(module) -> None:
    written = explicit_settings(module)
    missing = [what for what, (settings, options) in EXPLICIT.items()
               if not written & (settings | options)]
    if "worker_prefetch_multiplier" not in written and all(
            "prefetch_multiplier" in spec for spec in capstone.layout_of(module).values()):
        missing = [m for m in missing if m != "how many messages a worker reserves"]
    if missing:
        raise LabCheckFailed(
            f"{FLOW}.py relies on defaults it does not write out: {'; '.join(missing)}. Write "
            "each one down (a setting in app.conf, or the option on the task), even where you "
            "keep Celery's default: the next reader should not have to know it.")
    conf = module.app.conf
    if list(conf.accept_content) != ["json"] or conf.task_serializer != "json":
        raise LabCheckFailed("The flow must accept and send JSON only: another serializer lets a "
                             "message run code on the worker.")
    vt = (conf.broker_transport_options or {}).get("visibility_timeout")
    if vt is None:
        raise LabCheckFailed(
            f"{FLOW}.py leaves the broker's visibility timeout implicit: how long a message held "
            "by a dead worker waits before it is delivered again is one of the defaults the flow "
            "relies on (a broker transport option).")
    task = module.place_order
    if not (task.acks_late or conf.task_acks_late):
        raise LabCheckFailed(
            "place_order is acknowledged when it starts: a worker that dies mid-charge loses the "
            "order. When should a payment's message be acknowledged?")
    if not (task.reject_on_worker_lost or getattr(task, "retry_on_worker_lost", False)):
        raise LabCheckFailed(
            "When a pool process dies mid-charge (the OOM killer), place_order's message is "
            "acknowledged and the order is lost: chapter 4's table shows the options that give it "
            "another chance.")
    ok("every default the flow relies on is written out (acks, lost workers, prefetch, "
       "serializers, results, routes, visibility timeout)")


def _check_policy(module) -> None:
    task = module.place_order
    retry_for = tuple(getattr(task, "autoretry_for", ()) or ())
    if not retry_for:
        return  # a hand-written self.retry(): judged by what the burst shows
    covers = [exc for exc in (CardDeclined, InvalidOrder, KeyError) if issubclass(exc, retry_for)]
    if not issubclass(PaymentUnavailable, retry_for):
        raise LabCheckFailed("place_order retries on some errors, but not on the one the payment "
                             "provider raises when it is unavailable for a while.")
    if covers:
        raise LabCheckFailed(
            f"place_order retries on {covers[0].__name__} too: a declined card or a malformed "
            "order fails the same way every time; retrying only delays its dead letter. Retry "
            "what a later attempt can fix.")
    if not getattr(task, "retry_backoff", False):
        raise LabCheckFailed("place_order retries at a fixed delay: a provider that is down gets "
                             "hit again and again at the same pace. Back off.")
    if getattr(task, "retry_backoff_max", None) is None:
        raise LabCheckFailed(
            "place_order backs off with no cap written out: Celery then lets one wait grow to "
            "600 s (its default, celery/app/autoretry.py), ten minutes a checkout waits between "
            "two attempts. Write out the cap you mean.")
    if task.max_retries is None:
        raise LabCheckFailed("place_order retries forever (max_retries=None): an order whose "
                             "provider never recovers never reaches the dead letters.")
    ok(f"retry policy: {', '.join(e.__name__ for e in retry_for)} retried with backoff "
       f"(cap {task.retry_backoff_max} s), at most {task.max_retries} times")


def _check_dead_letter_source(module) -> None:
    """A dead-letter queue fed from ``Task.on_failure`` misses a task whose process was killed
    (chapter 5); this chaos run requeues its killed processes, so it is judged on what runs: the
    task's own ``on_failure`` (a base class, or ``on_failure=`` in the decorator) and the
    ``task_failure`` receivers this module connected, not on the file's text."""
    from celery import Task, signals
    task = module.place_order
    if hasattr(task, "_get_current_object"):  # a PromiseProxy until the app is finalized
        task = task._get_current_object()
    own_on_failure = type(task).on_failure is not Task.on_failure
    receivers = [r for r in signals.task_failure._live_receivers(task)
                 if getattr(r, "__globals__", None) is vars(module)]
    if own_on_failure and not receivers:
        raise LabCheckFailed(
            "Your dead letters are written by the task's on_failure. Chapter 5 showed what it "
            "misses: when the process running a task is killed, on_failure never runs (it runs in "
            "that process), and the order fails with no letter. Who else hears about every "
            "failure?")


def _check_routes(module) -> tuple[str, str]:
    checkout = capstone.route_of(module, "place_order")
    email = capstone.route_of(module, "send_receipt")
    layout = capstone.layout_of(module)
    if checkout == email:
        raise LabCheckFailed(
            f"place_order and send_receipt both go to the queue {checkout!r}: a checkout waits "
            "behind slow e-mails whenever they pile up. Give the slow work a queue of its own.")
    for queue in (checkout, email):
        if not any(queue in spec["queues"] for spec in layout.values()):
            raise LabCheckFailed(f"No worker in WORKERS consumes the queue {queue!r}: what is "
                                 "sent there waits forever.")
    both = [name for name, spec in layout.items()
            if checkout in spec["queues"] and email in spec["queues"]]
    if both:
        raise LabCheckFailed(
            f"The worker {both[0]!r} consumes both {checkout!r} and {email!r}: its processes "
            "fill up with e-mails and the checkouts wait. Isolate them: separate workers.")
    ok(f"checkout goes to {checkout!r} and e-mail to {email!r}, served by different workers")
    return checkout, email


def _check_validation(report) -> None:
    if report.accepted_malformed:
        raise LabCheckFailed(
            f"submit_order sent malformed orders to the workers ({', '.join(report.accepted_malformed)}): "
            "validate at the boundary, and refuse a bad order with an exception before anything "
            "is published.")
    if report.silently_dropped:
        raise LabCheckFailed(
            f"submit_order published nothing for malformed orders ({', '.join(report.silently_dropped)}), "
            "but it did not refuse them either: the caller cannot tell a dropped order from an "
            "accepted one. Refuse with an exception.")
    if report.unusual_refused:
        raise LabCheckFailed(
            f"submit_order refused a well-formed order ({capstone.UNUSUAL_BUT_VALID!r}): "
            f"{report.unusual_refused}. A one-cent total, an address with a '+', an extra field: "
            "the lab's contract allows them.")
    ok(f"the producer refused {len(report.refused)} malformed orders and sent nothing for them")


def _why_lost(report, oid: str) -> str:
    kind = oid.rsplit("-", 1)[0]
    runs = report.attempts.get(oid, [])
    if oid in report.paid and not report.charges.get(oid):
        how = report.crashed.get(oid)
        return ("it was marked paid and never charged" + (f": {how}, and " if how else ": ")
                + "a later run took what the first left behind for a charge already made. What "
                "does your code write before the charge has gone through?")
    if kind == "flaky":
        return ("the payment provider was unavailable for its first call(s), and the order was "
                "never tried again once it was back" if len(runs) < 2 else
                "the payment provider was unavailable for a while and the order gave up before it "
                "came back")
    if kind == "precharge":
        return ("its pool process was killed during the provider's call, before the charge went "
                "through, and the order never ran again: what does Celery do with the message of "
                "a task whose process died, and can you change that?")
    if kind == "oom":
        return ("its pool process was killed right after the charge (as the OOM killer would), "
                "and its message was acknowledged with the task marked failed: what does Celery "
                "do with the message of a task whose process died, and can you change that?")
    if kind == "crash":
        return ("its whole worker was SIGKILLed right after the charge, and its message did not "
                "come back: when is a message acknowledged?")
    return "it was never charged and marked paid (look at the worker's log)"


def _check_orders(report) -> None:
    if not report.settled:
        raise LabCheckFailed(
            "The flow did not settle within 30 s of the last incident: messages were still "
            "queued or held by a worker. A retry policy without a bound, a retry waiting "
            "Celery's default_retry_delay (180 s; a worker-lost retry waits that too), or a "
            "queue no worker consumes?")
    if report.lost:
        oid = report.lost[0]
        raise LabCheckFailed(f"Order {oid} was lost: {_why_lost(report, oid)}")
    ok(f"no order lost: {len(report.valid)} valid orders, each charged and marked paid")
    if report.double_charged:
        oid = report.double_charged[0]
        how = report.crashed.get(oid, "it ran more than once")
        raise LabCheckFailed(
            f"Order {oid} was charged {report.charges[oid]} times: {how}, and its message ran "
            "again. A payment can run twice; how does the second run recognise a charge already "
            "made?")
    ok("no double charge (through a pool process killed and a whole worker killed mid-flight)")
    if report.no_receipt:
        raise LabCheckFailed(f"Paid orders got no receipt: {', '.join(report.no_receipt)}. Where "
                             "did the e-mail's message go?")


def _retry_delays(attempts) -> list[float]:
    """The delay each retry was scheduled with (its ETA minus its publish time, from the
    recording): what the policy asked for, whatever the workers were doing meanwhile."""
    from datetime import datetime
    out = []
    for a in attempts:
        sent = next((e for e in a.events if e["event"] == "sent"), None)
        if a.retries and sent and sent.get("eta"):
            out.append(max(0.0, datetime.fromisoformat(sent["eta"]).timestamp() - sent["t"]))
    return out


def _check_dead_letters(report, autoretry: bool = False) -> None:
    for oid, error in report.poison.items():
        letter = report.letter_for(oid)
        if letter is None:
            what = {"": "a malformed message from a legacy client",
                    "CardDeclined": "a declined card",
                    "PaymentUnavailable": "a provider that never came back"}[error]
            raise LabCheckFailed(
                f"Order {oid} ({what}) failed for good and left no trace in `shop:dead`: a "
                "poison order must be dead-lettered, with its error, so that someone sees it.")
        text = letter.get("error") if isinstance(letter, dict) else None
        if not text or (error and error not in str(text)):
            raise LabCheckFailed(
                f"The dead letter of {oid} does not say what went wrong: it needs an `error` "
                f"naming the exception's class{' (' + error + ')' if error else ''}.")
    if report.letters_for_paid:
        raise LabCheckFailed(
            f"Order {report.letters_for_paid[0]} was paid, yet it has a dead letter: a letter is "
            "for a task that failed for good, not for an attempt that will be retried (replaying "
            "it would run the order again).")
    for oid, error in report.poison.items():
        tries = len(report.attempts.get(oid, []))
        if error != "PaymentUnavailable" and tries > 1:
            raise LabCheckFailed(
                f"Order {oid} was attempted {tries} times although it can never succeed "
                "(a declined card, a malformed order): retry only what a later attempt can fix.")
    waits = report.retry_waits
    # a hand-written self.retry() is judged by its waits; autoretry's declared policy was read
    # (its full jitter makes every wait 0 s now and then: 1 run in 360 here)
    if not autoretry and len(waits) >= 3 and max(waits) < 0.9:
        raise LabCheckFailed(
            f"The retries came back at once (longest wait {max(waits):.2f} s): a provider that "
            "is down is hammered. Back off, with a cap.")
    down = [oid for oid, error in report.poison.items() if error == "PaymentUnavailable"]
    for oid in down if not autoretry else ():
        spaced = _retry_delays(report.attempts.get(oid, []))
        if len(spaced) >= 2 and spaced[-1] < 1.5 * spaced[0]:
            raise LabCheckFailed(
                f"Order {oid}'s provider stayed down, and its retries were scheduled "
                f"{', '.join(f'{w:.1f}' for w in spaced)} s after each failure: the same pace "
                "each time. A provider that is down should be asked less and less often: back "
                "off, with a cap.")
    ok(f"{len(report.poison)} poison orders in the dead letters with their errors, none retried "
       "in vain; retries backed off")


def _check_p95(report) -> None:
    quiet, burst = report.p95(report.quiet), report.p95(report.burst)
    receipt = report.receipt_runtime or capstone.RECEIPT_SECONDS
    if quiet is None or burst is None:
        raise LabCheckFailed("Too few checkouts finished to measure their p95: the lost orders "
                             "above come first.")
    if quiet > receipt:
        raise MachineTooBusy(f"one checkout alone took {quiet:.2f} s (p95), longer than a "
                             f"receipt ({receipt:.2f} s).")
    target = max(3 * quiet, quiet + 0.5 * receipt)
    gap = report.longest_gap(report.burst_window) if report.burst_window else 0.0
    if burst > target and gap > 0.75:  # the machine, not the layout: the sampler stalled too
        raise MachineTooBusy(f"during the burst the course's sampler (a reading every 0.25 s) "
                             f"went {gap:.2f} s without one.")
    if burst > target:
        raise LabCheckFailed(
            f"Checkout p95 during the burst was {burst:.2f} s, against {quiet:.2f} s for the "
            f"same checkouts one at a time on an idle flow (target: {target:.2f} s, set from "
            "that baseline and the time one receipt takes, both measured in this run). Where do "
            "the checkouts wait during the burst, and behind what?")
    ok(f"checkout p95 {burst:.2f} s during the burst, {quiet:.2f} s when quiet (target "
       f"{target:.2f} s from this run's baseline)")


@checker
def check_lab08_contracts(stack) -> None:
    """Step 2: explicit contracts, checked in the module, then on a burst of the live flow."""
    module = capstone.load_flow(FLOW)
    _check_explicit(module)
    _check_policy(module)
    _check_routes(module)
    _check_dead_letter_source(module)
    try:
        report = capstone.chaos_run(stack, FLOW, phases=("validation", "burst"),
                                    verbose=False)
    finally:
        capstone.stop_flow_workers(stack)
    _check_validation(report)
    _check_orders(report)
    _check_dead_letters(report, autoretry=bool(getattr(module.place_order, "autoretry_for", ())))
    print("Step 2 passed: explicit contracts, and the burst's faults handled. The crashes and "
          "the p95 are the final check's.")


# --- step 3 ----------------------------------------------------------------------------------
def _check_watch(watch, module) -> dict:
    if not isinstance(watch, dict) or not isinstance(watch.get("queues"), (list, tuple)) or \
            not isinstance(watch.get("alert"), dict):
        raise LabCheckFailed('WATCH must be {"queues": [...], "alert": {"queue": ..., "above": '
                             'seconds, "for_seconds": seconds}}.')
    alert = watch["alert"]
    try:
        above, hold = float(alert["above"]), float(alert["for_seconds"])
    except (KeyError, TypeError, ValueError):
        raise LabCheckFailed('WATCH["alert"] needs "queue", and "above" and "for_seconds" as '
                             "numbers of seconds.") from None
    if above <= 0 or hold < 0:
        raise LabCheckFailed("The alert's threshold must be above 0 s, and its duration 0 s or more.")
    queues = {q for spec in capstone.layout_of(module).values() for q in spec["queues"]}
    unwatched = sorted(queues - set(watch["queues"]))
    if unwatched:
        raise LabCheckFailed(f"WATCH leaves queues of the flow unwatched: {unwatched}. Every "
                             "queue the flow uses should have its depth and lag recorded.")
    from celerylab.checks.lab07 import BURST_TRACE, TICK
    from celerylab.observe import LagAlert, Sample
    rule = LagAlert(above=above, for_seconds=hold)
    if any(rule.check(Sample(i * TICK, "q", depth, age, 0, 0))
           for i, (depth, age) in enumerate(BURST_TRACE)):
        raise LabCheckFailed(
            f"This alert ({above:g} s for {hold:g} s) would page for an ordinary burst: one that "
            "drains by itself can leave its oldest message waiting up to 2 s (lab 7's table; "
            "replayed here: a burst recorded from a real run). "
            "Pages for traffic that fixes itself get muted; raise the threshold, or ask it to "
            "hold for longer.")
    checkout = capstone.route_of(module, "place_order")
    if alert.get("queue") != checkout:
        raise LabCheckFailed(
            f"The alert watches {alert.get('queue')!r}, but checkouts wait in {checkout!r}: the "
            "alert should page when customers' orders stop moving.")
    return {"queues": list(watch["queues"]), "alert": dict(alert)}


def _check_alert(report, during_burst: bool) -> None:
    freeze, thaw = report.stall
    if report.fired(report.t0, freeze):
        when = min(t for t, f in report.alert_log if f) - report.t0
        raise LabCheckFailed(
            f"The alert fired {when:.1f} s into the run, before the stall, while orders were "
            f"flowing{' (a burst)' if during_burst else ''}: an alert that pages for normal "
            "traffic gets muted. Raise the threshold, or ask it to hold for longer.")
    if not report.fired(freeze, thaw + 0.5):
        peak = max((s.oldest_age or 0 for s in report.samples
                    if s.queue == report.checkout_queue and freeze <= s.t <= thaw + 0.5),
                   default=0)
        raise LabCheckFailed(
            f"The checkout queue stalled for {thaw - freeze:.1f} s (its oldest order waited "
            f"{peak:.1f} s) and the alert did not fire: it must page within the stall.")
    drained = report.drained_at or thaw
    until = report.crash_at or float("inf")  # the crash phase's restart may page again: not judged
    readings = [(t, f) for t, f in report.alert_log if t < until]
    late = [t for t, f in readings if f and t > drained + 3.0]
    still = readings and readings[-1][1]
    if late or still:
        raise LabCheckFailed("The alert was still firing 3 s after the checkout queue had "
                             "drained: an alert must clear once the lag is gone.")
    ok(f"the alert stayed quiet before the stall, fired during it and cleared after "
       f"({report.alert['above']:g} s for {report.alert['for_seconds']:g} s)")


@checker
def check_lab08_observability(watch, stack) -> None:
    """Step 3: every queue watched; the lag alert fires on a stall and clears after."""
    module = capstone.load_flow(FLOW)
    watch = _check_watch(watch, module)
    try:
        report = capstone.chaos_run(stack, FLOW, watch=watch, phases=("baseline", "stall"),
                                    verbose=False, quiet_orders=3)
    finally:
        capstone.stop_flow_workers(stack)
    _check_alert(report, during_burst=False)
    print("Step 3 passed: the stall would page someone, and the page clears.")


# --- step 4 ----------------------------------------------------------------------------------
def _sections(note: str) -> dict[str, str]:
    parts = re.split(r"^#+\s*(.+?)\s*$", note, flags=re.M)
    return {title.strip().rstrip(":.").strip().lower(): body
            for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def _words(text: str) -> int:
    return len(re.findall(r"[A-Za-z0-9_]+", text))


def _check_note(note, module) -> None:
    if not isinstance(note, str):
        raise LabCheckFailed("NOTE must be the note's text (a string).")
    if re.search(r"\bTODO\b", note, re.I):
        raise LabCheckFailed("The note still has TODO lines: replace each one with what your "
                             "flow does.")
    sections = _sections(note)
    for title in NOTE_SECTIONS:
        body = sections.get(title.lower())
        if body is None:
            raise LabCheckFailed(f"The note has no section '## {title}': keep the template's "
                                 "headings.")
        if _words(body) < MIN_WORDS:
            raise LabCheckFailed(f"The section '{title}' has {_words(body)} words: say what and "
                                 f"why, in {MIN_WORDS} words or more.")
    defaults = sections[NOTE_SECTIONS[0].lower()].lower()
    task_options = {o for _, options in EXPLICIT.values() for o in options} - {"queue"}
    written = changed_settings(module) | (_decorator_options(module) & task_options)
    aliases = {"broker_transport_options": "visibility_timeout"}

    def named(setting: str) -> bool:
        short = setting.lower().removeprefix("task_").removeprefix("worker_")
        return setting.lower() in defaults or short in defaults or \
            aliases.get(setting, setting) in defaults

    unnamed = sorted(s for s in written if not named(s))
    if unnamed:
        raise LabCheckFailed(f"'Defaults we chose' does not name every setting {FLOW}.py writes "
                             f"out: {', '.join(unnamed)}. Name each, with its value and why.")
    failures = sections[NOTE_SECTIONS[1].lower()].lower()
    missing = [what for what, words in FAILURE_WORDS.items()  # words, not parts of words
               if not any(re.search(rf"\b{w}", failures) for w in words)]
    if missing:
        raise LabCheckFailed(f"'Failures we expect' does not cover: {', '.join(missing)}. For "
                             "each, say what the flow does then.")
    debugging = sections[NOTE_SECTIONS[2].lower()].lower()
    if capstone.DEAD not in debugging or "alert" not in debugging:
        raise LabCheckFailed("'Debugging the common incidents' should tell the on-call engineer "
                             f"where to look: the dead letters ({capstone.DEAD}) and the lag "
                             "alert, at least.")
    ok("the architecture note is filled in: defaults named, failures covered, where to look")


@checker
def check_lab08_note(note, stack) -> None:
    """Step 4: the architecture note names the defaults, the failures and where to look."""
    _check_note(note, capstone.load_flow(FLOW))
    print("Step 4 passed.")


# --- the final check -------------------------------------------------------------------------
_LAST: dict = {}


def last_report():
    """The chaos run the final check measured last in this kernel, passed or not (to plot)."""
    from celerylab.errors import CourseError
    if "report" not in _LAST:
        raise CourseError("No chaos run to show yet: the final check's cell runs it. Run that "
                          "cell, then this one.")
    return _LAST["report"]


@checker
def check_lab08(watch, note, stack):
    """The final check: the chaos run replayed on your flow, every verdict at once. Returns the
    run's report (``report.plot()``)."""
    module = capstone.load_flow(FLOW)
    watch = _check_watch(watch, module)
    _check_routes(module)
    try:
        report = capstone.chaos_run(stack, FLOW, watch=watch)
    finally:
        capstone.stop_flow_workers(stack)
    _LAST["report"] = report
    report.show()
    _check_validation(report)
    _check_orders(report)
    _check_dead_letters(report, autoretry=bool(getattr(module.place_order, "autoretry_for", ())))
    if report.fired(report.t0, report.stall[0]):
        _check_p95(report)  # an alert during the burst may be right, if the checkouts lagged
        _check_alert(report, during_burst=True)
    else:  # what the watch saw first: the p95 depends on the machine's load too
        _check_alert(report, during_burst=True)
        _check_p95(report)
    _check_explicit(module)
    _check_policy(module)
    _check_dead_letter_source(module)
    _check_note(note, module)
    print("Lab 8 passed: the chaos run left no lost order, no double charge, every poison order "
          "in the dead letters, checkouts fast through the burst, and a page for the stall.")
    return report
