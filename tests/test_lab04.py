"""Lab 4 (exactly-once payments): the checker accepts right answers and rejects wrong ones,
with a busy-loop process running beside it.

Every variant is the solution's task module with a few exact replacements (each one asserted to
apply), so a change to the solution cannot silently turn a wrong answer into the solution.
"""

from __future__ import annotations

import nbformat
import pytest
from conftest import ROOT

from celerylab.checks import LabCheckFailed, check_lab04

pytestmark = pytest.mark.usefixtures("hog")

ACKS_LATE = "app.conf.task_acks_late = True"
REJECT = "app.conf.task_reject_on_worker_lost = True"
CREDIT = ('CREDIT_ONCE(keys=[f"payment:{payment_id}", "balances"],\n'
          "                args=[amount_cents, 7 * 24 * 3600, account])")
SCRIPT = '''CREDIT_ONCE = db.register_script("""
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
    return redis.call('HINCRBY', KEYS[2], ARGV[3], ARGV[1])
end
return false
""")'''
TASK = "@app.task\ndef apply_payment"
IMPORTS = "import time\n"

VARIANTS = {
    "solution": [],
    # correct, but not the solution's way ---------------------------------------------------
    # optimistic MULTI/EXEC on a hash of applied payments, and a crashed child's task re-sent as
    # a retry (celery 5.7) instead of requeued
    "watch-multi + retry on worker lost": [
        (IMPORTS, IMPORTS + "\nfrom redis.exceptions import WatchError\n"),
        (REJECT, "app.conf.task_retry_on_worker_lost = True"),
        (TASK, "@app.task(default_retry_delay=1)\ndef apply_payment"),
        (CREDIT, """with db.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch("payments:applied")
                if pipe.hexists("payments:applied", payment_id):
                    break
                pipe.multi()
                pipe.hset("payments:applied", payment_id, amount_cents)
                pipe.hincrby("balances", account, amount_cents)
                pipe.execute()
                break
            except WatchError:
                continue"""),
    ],
    # a Lua script checking set membership; the settings on the task instead of the app
    "lua set + task options": [
        (ACKS_LATE, "pass"),
        (REJECT, "pass"),
        (TASK, "@app.task(acks_late=True, reject_on_worker_lost=True)\ndef apply_payment"),
        (SCRIPT, '''CREDIT_ONCE = db.register_script("""
if redis.call('SISMEMBER', KEYS[1], ARGV[2]) == 1 then
    return false
end
redis.call('SADD', KEYS[1], ARGV[2])
return redis.call('HINCRBY', KEYS[2], ARGV[3], ARGV[1])
""")'''),
        (CREDIT, 'CREDIT_ONCE(keys=["payments:applied", "balances"],\n'
                 "                args=[amount_cents, payment_id, account])"),
    ],
    # wrong ----------------------------------------------------------------------------------
    "stub": [(ACKS_LATE, "raise NotImplementedError('your turn')")],
    "early ack": [(ACKS_LATE, "app.conf.task_acks_late = False")],
    "acks_late alone": [(REJECT, "pass")],
    "raises": [(CREDIT, 'db.hincrby("balances", acount, amount_cents)')],  # a typo
    "not idempotent": [(CREDIT, 'db.hincrby("balances", account, amount_cents)')],
    "memory expires in 2 s": [(CREDIT, CREDIT.replace("7 * 24 * 3600", "2"))],
    "keyed by task id": [(CREDIT, CREDIT.replace("{payment_id}", "{apply_payment.request.id}"))],
    "SET NX, then HINCRBY": [(CREDIT, """if db.set(f"payment:{payment_id}", 1, nx=True, ex=7 * 24 * 3600):
        db.hincrby("balances", account, amount_cents)""")],
    "GET, then HINCRBY, then SET": [(CREDIT, """if not db.get(f"payment:{payment_id}"):
        db.hincrby("balances", account, amount_cents)
        db.set(f"payment:{payment_id}", 1, ex=7 * 24 * 3600)""")],
    # crash-safe (the mark and the credit are one transaction), but the check is a command before
    "GET, then MULTI/EXEC of SET + HINCRBY": [(CREDIT, """if not db.get(f"payment:{payment_id}"):
        with db.pipeline(transaction=True) as pipe:
            pipe.set(f"payment:{payment_id}", 1, ex=7 * 24 * 3600)
            pipe.hincrby("balances", account, amount_cents)
            pipe.execute()""")],
    # race-safe (a duplicate takes its credit back), but a crash between the two writes is not
    "HINCRBY, then SET NX (undo if taken)": [(CREDIT, """db.hincrby("balances", account, amount_cents)
    if not db.set(f"payment:{payment_id}", 1, nx=True, ex=7 * 24 * 3600):
        db.hincrby("balances", account, -amount_cents)""")],
    "a client of its own": [
        (IMPORTS, IMPORTS + "\nimport redis\n"),
        ("CREDIT_ONCE = db.register_script(",
         "CREDIT_ONCE = redis.Redis.from_url(BROKER).register_script("),
    ],
}


def lab04_module(variant: str) -> str:
    """The solution's task module, or a variant of it."""
    nb = nbformat.read(ROOT / "solutions" / "lab04_exactly_once_payments.ipynb", as_version=4)
    cell = next(c.source for c in nb.cells if c.source.startswith("%%writefile lab04_tasks.py"))
    code = cell.split("\n", 1)[1]
    for old, new in VARIANTS[variant]:
        assert code.count(old) == 1, (variant, old)
        code = code.replace(old, new)
    return code


@pytest.mark.parametrize("variant, hint", [
    ("solution", None),
    ("watch-multi + retry on worker lost", None),
    ("lua set + task options", None),
    ("stub", "NotImplementedError"),
    ("early ack", "message is gone"),
    ("acks_late alone", "pay-G was lost: its pool process was SIGKILLed"),
    ("raises", "apply_payment failed for pay-A: NameError"),
    ("not idempotent", "acct-A holds 2000"),
    ("memory expires in 2 s", r"`payment:pay-A` is gone in [0-2] s"),
    ("keyed by task id", "the client sent pay-E twice"),
    ("GET, then HINCRBY, then SET", "acct-F holds 120.*both copies credited it"),
    ("GET, then MULTI/EXEC of SET + HINCRBY", "acct-F holds 120.*both copies credited it"),
    ("SET NX, then HINCRBY", r"pay-H was lost.*first write \(SET\).*ran again, and was not"),
    ("HINCRBY, then SET NX (undo if taken)",
     r"acct-H holds 16000.*first write \(HINCRBY\).*credited again"),
    ("a client of its own", "pay-F sent no command through the module's `db`"),
])
def test_lab04_checker(stack, tmp_path, monkeypatch, capsys, variant, hint):
    (tmp_path / "lab04_tasks.py").write_text(lab04_module(variant))
    monkeypatch.chdir(tmp_path)
    if hint is None:
        check_lab04(stack)
        out = capsys.readouterr().out
        assert "Lab 4 passed" in out
        assert "lockstep: credited once" in out and "first write" in out
    else:
        with pytest.raises(LabCheckFailed, match=hint):
            check_lab04(stack)
