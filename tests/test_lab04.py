"""Lab 4 (exactly-once payments): the checker accepts right answers and rejects wrong ones,
with a busy-loop process running beside it."""

from __future__ import annotations

import nbformat
import pytest
from conftest import ROOT

from celerylab.checks import LabCheckFailed, check_lab04

pytestmark = pytest.mark.usefixtures("hog")


def lab04_module(variant: str) -> str:
    """The solution's task module, or a wrong variant of it."""
    nb = nbformat.read(ROOT / "solutions" / "lab04_exactly_once_payments.ipynb", as_version=4)
    cell = next(c.source for c in nb.cells if c.source.startswith("%%writefile lab04_tasks.py"))
    code = cell.split("\n", 1)[1]
    if variant == "early ack":
        code = code.replace("app.conf.task_acks_late = True", "app.conf.task_acks_late = False")
    elif variant == "not idempotent":
        code = code.replace('CREDIT_ONCE(keys=[f"payment:{payment_id}", "balances"],',
                            'db.hincrby("balances", account, amount_cents) or (')
        code = code.replace("args=[amount_cents, 7 * 24 * 3600, account])", ")")
    elif variant == "stub":
        code = code.replace("app.conf.task_acks_late = True",
                            "raise NotImplementedError('your turn')")
    assert variant == "solution" or code != cell.split("\n", 1)[1], variant
    return code


@pytest.mark.parametrize("variant, hint", [
    ("solution", None),
    ("stub", "NotImplementedError"),
    ("early ack", "message is gone"),
    ("not idempotent", "acct-A holds 2000"),
])
def test_lab04_checker(stack, tmp_path, monkeypatch, capsys, variant, hint):
    (tmp_path / "lab04_tasks.py").write_text(lab04_module(variant))
    monkeypatch.chdir(tmp_path)
    if hint is None:
        check_lab04(stack)
        assert "Lab 4 passed" in capsys.readouterr().out
    else:
        with pytest.raises(LabCheckFailed, match=hint):
            check_lab04(stack)
