"""Lab 10 (an order workflow that fails safely): the checker accepts right answers and rejects
wrong ones of different kinds, with a busy loop beside the solution and the other answers judged
side by side (conftest.side_by_side).

An answer is the solution's task module with a few exact replacements, each asserted to apply, so
a change to the solution cannot silently turn a wrong answer into it.
"""

from __future__ import annotations

import sys

import nbformat
import pytest
from conftest import ROOT, assert_verdict

from celerylab.checks import check_lab10

pytestmark = pytest.mark.usefixtures("hog")

ACKS = "    task_acks_late=True,  # a worker killed mid-step gives the step back\n"
CHARGE_KEY = 'idempotency_key=f"charge:{order_id}"'
SHIP_CALL = '    return warehouse_ship(order_id, item, idempotency_key=f"ship:{order_id}:{item}")'
RECEIPT_CALL = '    send_receipt(order_id, tracking, idempotency_key=f"receipt:{order_id}")'
ON_TIMEOUT = "    except GatewayTimeout as exc:  # it may have charged: ask again, with the same key"
CHARGE_DECORATOR = "@app.task(bind=True)\ndef charge(self, order_id):"
ERRBACK = "    flow.link_error(order_failed.s(order_id))  # every step; a chord's body gets ChordError\n"
AGE_TEST = "        if age > stuck_after and not"
SHIP_OR_NONE = """    try:
        return warehouse_ship(order_id, item, idempotency_key=f"ship:{order_id}:{item}")
    except OutOfStock:
        return None"""

VARIANTS = {
    "solution": [],
    # right, but not the solution's way -----------------------------------------------------------
    # shipments report what they could not do and the receipt step decides; no error callback
    # at all: the sweep records every order that cannot finish, refused cards included
    "receipt checks, sweep records all": [
        (SHIP_CALL, SHIP_OR_NONE),
        (RECEIPT_CALL, """    if None in tracking:
        record_failed(order_id, "an item could not ship")
        return
    send_receipt(order_id, tracking, idempotency_key=f"receipt:{order_id}")"""),
        (ERRBACK, ""),
    ],
    # celery's own retry options on the decorator, and the order id alone as the key
    "autoretry, order id as key": [
        (CHARGE_DECORATOR, "@app.task(bind=True, autoretry_for=(GatewayTimeout,), retry_backoff=1,"
                           " retry_jitter=False, max_retries=4)\ndef charge(self, order_id):"),
        (ON_TIMEOUT, "    except ZeroDivisionError as exc:"),
        (CHARGE_KEY, "idempotency_key=order_id"),
    ],
    # wrong ---------------------------------------------------------------------------------------
    "stub": [],  # the learner's copy, as generated
    "no idempotency key": [(CHARGE_KEY, "idempotency_key=None")],
    "a fresh key per attempt": [
        (SHIP_CALL, '    return warehouse_ship(order_id, item, idempotency_key=os.urandom(8).hex())')],
    "early ack": [(ACKS, "    task_acks_late=False,\n")],
    "no retry on a timeout": [(ON_TIMEOUT, "    except ZeroDivisionError as exc:")],
    "chain swallows errors": [
        (ON_TIMEOUT, "    except Declined:\n        return None\n" + ON_TIMEOUT)],
    "receipt assumes every shipment": [(SHIP_CALL, SHIP_OR_NONE)],
    # "it probably went through": a timeout before the bank charged ships an unpaid order
    "a timeout taken for a success": [
        (ON_TIMEOUT, "    except GatewayTimeout:\n        return None\n" + ON_TIMEOUT)],
    "a fresh receipt key per attempt": [
        (RECEIPT_CALL, '    send_receipt(order_id, tracking, idempotency_key=os.urandom(8).hex())')],
    "errback only, no sweep": [(AGE_TEST, "        if False and not")],
    "sweep ignores age": [(AGE_TEST, "        if True and not")],
}


def _module(variant: str) -> str:
    where = "labs" if variant == "stub" else "solutions"
    nb = nbformat.read(ROOT / where / "lab10_order_workflow.ipynb", as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    module = next(c for c in code if c.startswith("%%writefile lab10_tasks.py")).split("\n", 1)[1]
    for old, new in VARIANTS[variant]:
        assert module.count(old) == 1, (variant, old, module.count(old))
        module = module.replace(old, new)
    return module


def judge(stack, folder, variant, **_):
    """One answer's live check (conftest.judge_here): its module, then the check cell."""
    (folder / "lab10_tasks.py").write_text(_module(variant))
    sys.modules.pop("lab10_tasks", None)
    check_lab10(stack)


@pytest.mark.parametrize("variant, hint", [
    ("solution", None),
    ("receipt checks, sweep records all", None),
    ("autoretry, order id as key", None),
    ("stub", "lab10_tasks.py is not written yet"),
    ("no idempotency key", "timeout-after was charged 2 times"),
    ("a fresh key per attempt", "crash-chord's lamp was shipped 2 times"),
    ("early ack", r"crash-\w+ never finished after the worker was killed"),
    ("no retry on a timeout", "timeout-after never finished after the bank charged it"),
    ("chain swallows errors", "declined's card was refused, and yet it shipped"),
    ("receipt assumes every shipment", "nostock got a receipt"),
    ("a timeout taken for a success", "timeout-before shipped without being charged"),
    ("a fresh receipt key per attempt", "crash-receipt got 2 receipts"),
    ("errback only, no sweep", r"expired's chord state was deleted.*did not record it"),
    ("sweep ignores age", "recorded young"),
])
def test_lab10_checker(verdict, variant, hint):
    out = assert_verdict(verdict, hint)
    if hint is None:
        assert "Lab 10 passed" in out and "recorded it" in out and "finished after the SIGKILL" in out
