"""Lab 9 (orders that survive the broker): the checker accepts right answers and rejects wrong ones
of different kinds, with a busy loop beside the solution and the other answers judged side by side
(conftest.side_by_side).

An answer is the solution's task module and request-path cells with a few exact replacements, each
asserted to apply, so a change to the solution cannot silently turn a wrong answer into it.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
import uuid

import nbformat
import pytest
from conftest import ROOT, assert_verdict
from kombu.exceptions import OperationalError

from celerylab import outage
from celerylab.checks import check_lab09

pytestmark = pytest.mark.usefixtures("hog")

ACKS = "    task_acks_late=True,  # a dropped connection or a dead worker gives the order back\n"
TIMEOUTS = ('    broker_transport_options={**app.conf.broker_transport_options,\n'
            '                              "socket_timeout": 0.5, "socket_connect_timeout": 0.5},\n')
RETRY_SETTING = "    broker_connection_retry=True,\n"
BOUND = "RECONNECT_WITHIN_S = 35"
SHIP = 'SHIP_ONCE(keys=[f"shipped:{order_id}", "shipped"], args=[order_id, 7 * 24 * 3600])'
SUBMIT = ("        tasks.record_order.apply_async((order_id,), retry=True, retry_policy={\"max_retries\": 0})"
          "\n        return \"sent\"")
OUTBOX_WRITE = """        with OUTBOX:
            OUTBOX.execute("INSERT OR IGNORE INTO outbox VALUES (?)", (order_id,))
        return "outbox\""""
DELETE = """        with OUTBOX:  # deleted only once sent
            OUTBOX.execute("DELETE FROM outbox WHERE order_id = ?", (order_id,))
"""
PROBE_BODY = "    canary = f\"canary-{uuid.uuid4().hex[:8]}\""
DRAIN_START = "    sent = 0\n    for (order_id,) in OUTBOX.execute(\"SELECT order_id FROM outbox\").fetchall():"

VARIANTS = {
    "solution": [],
    # right, but not the solution's way -----------------------------------------------------------
    # early ack (running orders are acknowledged, so a dropped connection does not repeat them),
    # an outbox of one file per order, and a publish that retries twice on its own policy
    "early ack, file outbox, bounded retry": [
        (ACKS, "    task_acks_late=False,\n"),
        (SUBMIT, """        tasks.record_order.apply_async(
            (order_id,), retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.1,
                          "interval_max": 0.1})
        return "sent\""""),
        (OUTBOX_WRITE, """        import pathlib
        folder = pathlib.Path("outbox-files")
        folder.mkdir(exist_ok=True)
        (folder / f"{order_id}.order").write_text(order_id)
        return "outbox\""""),
        (DRAIN_START, """    import pathlib
    sent = 0
    for path in sorted(pathlib.Path("outbox-files").glob("*.order")):
        try:
            tasks.record_order.apply_async((path.read_text(),), retry=False)
        except OperationalError:
            break
        path.unlink()
        sent += 1
    for (order_id,) in []:"""),
    ],
    # the probe judges the canary's age from the queue itself, not the effect
    "probe by the queue's own state": [
        (PROBE_BODY, """    canary = f"canary-{uuid.uuid4().hex[:8]}"
    tasks.record_order.apply_async((canary,), retry=False)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if canary.encode() in db.lrange("attempts", -50, -1):
            return True
        time.sleep(0.1)
    return False"""),
    ],
    # wrong ---------------------------------------------------------------------------------------
    "stub": [],  # the learner's copy, as generated
    "acks_late, not idempotent": [(SHIP, 'db.hincrby("shipped", order_id, 1)')],
    "publish retries forever": [(SUBMIT, """        tasks.record_order.apply_async(
            (order_id,), retry=True, retry_policy={"max_retries": None})
        return "sent\"""")],
    "no socket timeout": [(TIMEOUTS, "")],
    "outbox in the broker": [(OUTBOX_WRITE, """        import redis
        redis.Redis.from_url(os.environ["LAB09_BROKER"]).rpush("outbox", order_id)
        return "outbox\"""")],
    "probe pings": [(PROBE_BODY, """    return bool(tasks.app.control.ping(timeout=3))
    canary = None""")],
    "bound too tight": [(BOUND, "RECONNECT_WITHIN_S = 4")],  # met by the check's 2.5 s outage
    "no reconnect": [(RETRY_SETTING, "    broker_connection_retry=False,\n")],
    "drain keeps sent rows": [(DELETE, "")],
    # a drain that deletes a row before it knows the order was sent, and swallows the error
    "drain deletes first": [(DRAIN_START, """    sent = 0
    rows = OUTBOX.execute("SELECT order_id FROM outbox").fetchall()
    with OUTBOX:
        OUTBOX.execute("DELETE FROM outbox")
    for (order_id,) in rows:
        try:
            tasks.record_order.apply_async((order_id,), retry=True, retry_policy={"max_retries": 0})
            sent += 1
        except OperationalError:
            pass
    for (order_id,) in []:""")],
    # the probe asks the control channel, which a frozen pool does not change
    "probe asks active_queues": [(PROBE_BODY, """    found = tasks.app.control.inspect(timeout=3).active_queues() or {}
    return any(q["name"] == "celery" for queues in found.values() for q in queues)
    canary = None""")],
    # idempotent for a while: the memory expires after 10 s
    "memory expires in 10 s": [(SHIP, SHIP.replace("7 * 24 * 3600", "10"))],
    # the transport options replaced: right on a plain Redis, lost on a Sentinel set
    "master_name dropped": [(TIMEOUTS, '    broker_transport_options={"socket_timeout": 0.5, '
                                       '"socket_connect_timeout": 0.5},\n')],
}


def _cells(variant: str) -> tuple[str, str]:
    """(the task module, the request path and probe cells), with the variant's replacements."""
    where = "labs" if variant == "stub" else "solutions"
    nb = nbformat.read(ROOT / where / "lab09_broker_failures.ipynb", as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    module = next(c for c in code if c.startswith("%%writefile lab09_tasks.py")).split("\n", 1)[1]
    path = "\n".join(c for c in code if "def submit(" in c or "def probe(" in c
                     or c.startswith("import lab09_tasks"))
    for old, new in VARIANTS[variant]:
        hits = module.count(old) + path.count(old)
        assert hits == 1, (variant, old, hits)
        module, path = module.replace(old, new), path.replace(old, new)
    return module, path


def judge(stack, folder, variant, **_):
    """One answer's live check (conftest.judge_here): its module and cells, a broker to break."""
    module, path = _cells(variant)
    (folder / "lab09_tasks.py").write_text(module)
    sys.modules.pop("lab09_tasks", None)
    broker = outage.spare_broker(stack)
    os.environ["LAB09_BROKER"] = broker.url
    scope = {"db": stack.redis, "uuid": uuid, "time": time, "os": os, "stack": stack,
             "sqlite3": sqlite3, "OperationalError": OperationalError}
    try:
        exec(compile(path, "lab09 cells", "exec"), scope)
    except NotImplementedError:
        pass  # a stub: the check says so
    check_lab09(scope.get("submit"), scope.get("drain_outbox"), scope.get("probe"), broker, stack)


@pytest.mark.parametrize("variant, hint", [
    ("solution", None),
    ("early ack, file outbox, bounded retry", None),
    ("probe by the queue's own state", None),
    ("stub", "lab09_tasks.py is not written yet"),
    ("acks_late, not idempotent", "drop-[12] shipped 2 times"),
    ("publish retries forever", r"broker down.*had not returned after [\d.]+ s"),
    ("no socket timeout", r"frozen.*had not returned after [\d.]+ s"),
    ("outbox in the broker", r"submit\('down-1'\) raised ConnectionError"),
    ("probe pings", "answered ping"),
    ("bound too tight", r"RECONNECT_WITHIN_S = 4: a short outage may meet it"),
    ("no reconnect", "The worker exited"),
    ("drain keeps sent rows", "A second drain_outbox"),
    ("master_name dropped", "could not find the primary"),
    ("drain deletes first", r"drain_outbox\(\) returned 0 with the broker up again.*could not send"),
    ("probe asks active_queues", "pool processes were frozen"),
    ("memory expires in 10 s", r"`shipped:\w+-1` expires in \d+ s"),
])
def test_lab09_checker(verdict, variant, hint):
    out = assert_verdict(verdict, hint)
    if hint is None:
        assert "Lab 9 passed" in out and "probe() said unhealthy" in out
        assert "primary killed with orders in flight" in out and "not shipped twice" in out
