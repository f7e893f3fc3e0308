"""Lab 8 (the capstone): each step's checker and the final check accept the solution and reject
the shipped flow, the unsolved lab and partial fixes of different kinds, each with a hint that
names the symptom; a busy-loop process beside the solution, the other live answers judged
side by side (conftest.side_by_side; the soak: beside all of it).

Static rejections (settings, routes, the watch's shape, the note) fail before any worker starts;
the others run the live chaos run (about 20 s each).
"""

from __future__ import annotations

import nbformat
import pytest
from conftest import ROOT, assert_verdict, expect_verdict

from celerylab.checks import (
    LabCheckFailed,
    check_lab08,
    check_lab08_contracts,
    check_lab08_note,
    check_lab08_observability,
    check_lab08_tests,
)
from celerylab.errors import CourseError

pytestmark = pytest.mark.usefixtures("hog")

LAB = "lab08_capstone"


def cell(folder: str, starts: str) -> str:
    nb = nbformat.read(ROOT / folder / f"{LAB}.ipynb", as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code" and starts in c.source)


def module_code(name: str, folder: str = "solutions", changes=()) -> str:
    code = cell(folder, f"%%writefile {name}.py").split("\n", 1)[1]
    for old, new in changes:
        assert old in code, old
        code = code.replace(old, new)
    return code


def solution(name: str):
    """The solution notebook's value of ``name`` (TESTS, WATCH, NOTE)."""
    scope: dict = {}
    exec(compile(cell("solutions", f"{name} = "), LAB, "exec"), scope)
    return scope[name]


@pytest.fixture
def lab08(tmp_path, monkeypatch, stack):
    """A notebook folder with shop_v1.py; ``write(changes)`` writes a shop_tasks.py variant."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shop_v1.py").write_text(module_code("shop_v1"))

    def write(changes=(), code=None):
        (tmp_path / "shop_tasks.py").write_text(code or module_code("shop_tasks", changes=changes))
    write()
    return write


WATCH = solution("WATCH")
NOTE = solution("NOTE")
TESTS = solution("TESTS")


def test_shop_v1_is_the_same_in_chapter_8_and_lab_8():
    nb = nbformat.read(ROOT / "notebooks" / "ch08_capstone.ipynb", as_version=4)
    chapter = next(c.source for c in nb.cells if c.source.startswith("%%writefile shop_v1.py"))
    assert chapter == cell("solutions", "%%writefile shop_v1.py")


# --- the final check ---------------------------------------------------------------------------
def judge(stack, folder, changes=(), step="final", watch=None, note=None, double_charge=None,
          **_):
    """One answer's live check (conftest.judge_here): shop_v1.py, a shop_tasks.py variant, and
    the final check (the solution's WATCH and NOTE where not given), step 2's or step 1's (the
    solution's tests, one replaced)."""
    (folder / "shop_v1.py").write_text(module_code("shop_v1"))
    (folder / "shop_tasks.py").write_text(module_code("shop_tasks", changes=changes))
    if step == "contracts":
        check_lab08_contracts(stack)
    elif step == "tests":
        check_lab08_tests({**TESTS, "double_charge": STEP1[double_charge]}, stack)
    else:
        check_lab08(watch or WATCH, note or NOTE, stack)


def test_final_check_accepts_the_solution(verdict):
    out = assert_verdict(verdict, None)
    assert "Lab 8 passed" in out and "no double charge" in out


# A hand-written retry (self.retry with a capped countdown) instead of autoretry, the order id
# itself as the provider's key, 5.7's retry_on_worker_lost instead of reject, and another split
# of the process budget.
UNUSUAL = [
    ("@app.task(autoretry_for=(PaymentUnavailable,), retry_backoff=1, retry_backoff_max=4,\n"
     "          retry_jitter=True, max_retries=3)\ndef place_order(order):",
     "@app.task(bind=True, max_retries=3, default_retry_delay=1)\n"
     "def place_order(self, order):"),
    ("    payments.charge(order[\"id\"], order[\"total_cents\"], idempotency_key=f\"order:{order['id']}\")",
     "    try:\n"
     "        payments.charge(order[\"id\"], order[\"total_cents\"], idempotency_key=order[\"id\"])\n"
     "    except PaymentUnavailable as exc:\n"
     "        raise self.retry(exc=exc, countdown=min(4, 2 ** self.request.retries))"),
    ("task_reject_on_worker_lost=True", "task_retry_on_worker_lost=True"),
    ('"checkout": {"queues": ["checkout"], "concurrency": 2}',
     '"checkout": {"queues": ["checkout"], "concurrency": 3}'),
    ('"email": {"queues": ["email"], "concurrency": 2}',
     '"mail": {"queues": ["email"], "concurrency": 1}'),
    ('    task_routes={"shop_tasks.send_receipt": {"queue": "email"}},  # slow: apart\n', ""),
    ("@app.task\ndef send_receipt", '@app.task(queue="email")  # routed on the task itself\n'
     "def send_receipt"),
]
UNUSUAL_NOTE = NOTE.replace("task_reject_on_worker_lost", "task_retry_on_worker_lost").replace(
    "task_routes sending send_receipt", "send_receipt's queue option sending it")


@pytest.mark.parametrize("changes, note", [(UNUSUAL, UNUSUAL_NOTE)],
                         ids=["self-retry-order-key-retry-on-lost-routed-on-task"])
def test_final_check_accepts_unusual_answers(verdict, changes, note):
    assert "Lab 8 passed" in assert_verdict(verdict, None)


def test_final_check_rejects_the_shipped_flow(lab08, stack):
    lab08(code=module_code("shop_v1").replace('"shop_v1"', '"shop_tasks"'))
    watch = {"queues": ["celery"], "alert": {**WATCH["alert"], "queue": "celery"}}
    with pytest.raises(LabCheckFailed, match="both go to the queue 'celery'"):
        check_lab08(watch, NOTE, stack)


@pytest.mark.parametrize("changes, hint", [
    pytest.param([(", idempotency_key=f\"order:{order['id']}\"", "")],
                 r"Order crash-\d+ was charged 2 times: its whole worker .* recognise a charge",
                 id="no-idempotency"),
    pytest.param([("    task_reject_on_worker_lost=True,", "")],
                 r"Order oom-\d+ was lost: its pool process was killed .* can you change that",
                 id="acks-late-alone"),
    pytest.param([("autoretry_for=(PaymentUnavailable,)", "autoretry_for=(Exception,)")],
                 # on a busy machine its retries of the declined card may outlast the settle
                 # bound first: a right rejection too (seen once in a soak beside a busy loop)
                 r"attempted \d times although it can never succeed|did not settle within 30 s",
                 id="retries-everything"),
    pytest.param([("    validate(order)  # a legacy",
                   "    try:\n        validate(order)\n    except InvalidOrder:\n"
                   "        db.lpush(DEAD_LETTERS, json.dumps({'id': order.get('id'), "
                   "'error': 'InvalidOrder'}))\n        raise\n    # a legacy"),
                  ("    payments.charge(order[\"id\"]", "    try:\n        payments.charge(order[\"id\"]"),
                  (", idempotency_key=f\"order:{order['id']}\")",
                   ", idempotency_key=f\"order:{order['id']}\")\n    except Exception as exc:\n"
                   "        db.lpush(DEAD_LETTERS, json.dumps({'order': order, "
                   "'error': type(exc).__name__}))\n        raise")],
                 r"was paid, yet it has a dead letter", id="dead-letter-on-every-failure"),
    pytest.param([("    payments.charge(order[\"id\"], order[\"total_cents\"], idempotency_key=f\"order:{order['id']}\")",
                   "    if db.set(f\"charging:{order['id']}\", 1, nx=True):\n"
                   "        try:\n"
                   "            payments.charge(order[\"id\"], order[\"total_cents\"])\n"
                   "        except Exception:\n"
                   "            db.delete(f\"charging:{order['id']}\")\n"
                   "            raise")],
                 r"Order precharge-\d+ was lost: it was marked paid and never charged",
                 id="flag-before-the-charge"),
])
def test_final_check_rejects_partial_fixes(verdict, changes, hint):
    assert_verdict(verdict, hint)


@pytest.mark.parametrize("watch, hint", [
    ({**WATCH, "alert": {**WATCH["alert"], "above": 8.0}}, r"stalled for .* did not fire"),
], ids=["above-8-s"])
def test_final_check_rejects_an_alert_that_never_fires(verdict, watch, hint):
    assert_verdict(verdict, hint)


@pytest.mark.parametrize("changes, hint", [
    pytest.param([('"checkout": {"queues": ["checkout"], "concurrency": 2}',
                   '"checkout": {"queues": ["checkout", "email"], "concurrency": 2}')],
                 "consumes both 'checkout' and 'email'", id="shared-worker"),
    pytest.param([('    task_routes={"shop_tasks.send_receipt": {"queue": "email"}},', "")],
                 "both go to the queue 'checkout'", id="no-route"),
    pytest.param([('"email": {"queues": ["email"], "concurrency": 2}',
                   '"email": {"queues": ["email"], "concurrency": 3}')],
                 "budget is 3 workers and 4 processes", id="over-budget"),
])
def test_final_check_rejects_layouts_before_running(lab08, stack, changes, hint):
    lab08(changes)
    with pytest.raises(CourseError, match=hint):
        check_lab08(WATCH, NOTE, stack)


def test_unsolved_lab_module_says_where_to_write(lab08, stack):
    lab08(code=module_code("shop_tasks", folder="labs"))
    with pytest.raises(CourseError, match="raise NotImplementedError"):
        check_lab08_contracts(stack)


# --- step 1 ------------------------------------------------------------------------------------
def test_step1_accepts_the_solution_tests(lab08, stack):
    expect_verdict(check_lab08_tests, TESTS, stack)


def vacuous(shop):
    order = shop.place_while_worker_crashes()
    assert shop.charges(order) >= 1


def reproduces_nothing(shop):
    order = shop.place_with_flaky_payments()
    assert shop.charges(order) == 2  # flaky payments never charge twice in shop_v1


STEP1 = {"cannot-fail": vacuous, "does-not-reproduce": reproduces_nothing,
         "another-incident": TESTS["silent_poison"]}


@pytest.mark.parametrize("double_charge, hint", [
    ("cannot-fail", "also passes when nothing goes wrong"),
    ("does-not-reproduce", "On the shipped flow .* failed: its assertion failed"),
    ("another-incident", "reproduces another one"),
], ids=["a-test-that-cannot-fail", "a-test-that-does-not-reproduce-its-incident",
        "a-test-of-another-incident"])
@pytest.mark.parametrize("step", ["tests"])
def test_step1_rejects(verdict, double_charge, hint, step):
    assert_verdict(verdict, hint)


def test_step1_rejects_missing_tests_and_stubs(lab08, stack):
    with pytest.raises(LabCheckFailed, match="keys"):
        check_lab08_tests({"double_charge": TESTS["double_charge"]}, stack)

    def stub(shop):
        raise NotImplementedError("Your turn")
    with pytest.raises(LabCheckFailed, match="not written yet"):
        check_lab08_tests({**TESTS, "double_charge": stub}, stack)


# --- step 2 ------------------------------------------------------------------------------------
def test_step2_accepts_the_solution(lab08, stack, capsys):
    expect_verdict(check_lab08_contracts, stack)
    assert "Step 2 passed" in capsys.readouterr().out


@pytest.mark.parametrize("changes, hint", [
    pytest.param([("    result_expires=86400,", "")], "how long results are kept", id="implicit-expiry"),
    pytest.param([('    broker_transport_options={"visibility_timeout": 3600},', "")],
                 "visibility timeout implicit", id="implicit-visibility"),
    pytest.param([("max_retries=3", "max_retries=None")], "retries forever", id="unbounded"),
    pytest.param([("retry_backoff=1, ", "retry_backoff=False, ")], "fixed delay", id="no-backoff"),
    pytest.param([("@signals.task_failure.connect\ndef dead_letter(sender=None, task_id=None, "
                   "exception=None, args=None, kwargs=None, **_):",
                   "class Lettered(app.Task):\n    def on_failure(self, exc, task_id, args, kwargs, einfo):\n"
                   "        dead_letter(self, task_id, exc, args, kwargs)\n\n\n"
                   "def dead_letter(sender=None, task_id=None, exception=None, args=None, kwargs=None, **_):")],
                 # the class is never given to the task: no letter at all, as the run shows
                 "left no trace in `shop:dead`", id="on-failure-class-unused"),
    pytest.param([("@signals.task_failure.connect\ndef dead_letter(sender=None, task_id=None, "
                   "exception=None, args=None, kwargs=None, **_):",
                   "# not task_failure: on_failure, given to the decorator\n"
                   "def dead_letter(sender=None, task_id=None, exception=None, args=None, kwargs=None, **_):"),
                  ("          retry_jitter=True, max_retries=3)\ndef place_order(order):",
                   "          retry_jitter=True, max_retries=3,\n"
                   "          on_failure=lambda self, exc, task_id, args, kwargs, einfo: "
                   "dead_letter(self, task_id, exc, args, kwargs))\ndef place_order(order):")],
                 "on_failure", id="on-failure-in-the-decorator"),
    pytest.param([("retry_backoff=1, retry_backoff_max=4,", "retry_backoff=1,")],
                 "no cap written out", id="no-cap"),
])
def test_step2_static_rejections(lab08, stack, changes, hint):
    lab08(changes)
    with pytest.raises(LabCheckFailed, match=hint):
        check_lab08_contracts(stack)


@pytest.mark.parametrize("changes, hint", [
    pytest.param([("    return place_order.delay(validate(order))", "    return place_order.delay(order)")],
                 "sent malformed orders to the workers", id="no-validation"),
    pytest.param([("    return order\n", "    if set(order) != {'id', 'total_cents', 'email'}:\n"
                   "        raise InvalidOrder('unexpected fields')\n    return order\n")],
                 "refused a well-formed order", id="too-strict"),
    pytest.param([("    return place_order.delay(validate(order))",
                   "    try:\n        validate(order)\n    except InvalidOrder:\n        return None\n"
                   "    return place_order.delay(order)")],
                 "did not refuse them either", id="drops-silently"),
    pytest.param([("@app.task(autoretry_for=(PaymentUnavailable,), retry_backoff=1, retry_backoff_max=4,\n"
                   "          retry_jitter=True, max_retries=3)\ndef place_order(order):",
                   "@app.task(bind=True, max_retries=3)\ndef place_order(self, order):"),
                  ("    payments.charge(order[\"id\"], order[\"total_cents\"], idempotency_key=f\"order:{order['id']}\")",
                   "    try:\n"
                   "        payments.charge(order[\"id\"], order[\"total_cents\"], idempotency_key=order[\"id\"])\n"
                   "    except PaymentUnavailable as exc:\n"
                   "        raise self.retry(exc=exc, countdown=1)")],
                 "the same pace each time", id="fixed-pace-by-hand"),
])
@pytest.mark.parametrize("step", ["contracts"])
def test_step2_live_rejections(verdict, changes, hint, step):
    assert_verdict(verdict, hint)


# --- step 3 ------------------------------------------------------------------------------------
def test_step3_accepts_the_solution(lab08, stack):
    expect_verdict(check_lab08_observability, WATCH, stack)


@pytest.mark.parametrize("watch, hint", [
    pytest.param({**WATCH, "alert": {**WATCH["alert"], "queue": "email"}}, "checkouts wait in",
                 id="wrong-queue"),
    pytest.param({**WATCH, "queues": ["checkout"]}, "unwatched", id="unwatched-queue"),
    pytest.param({"queues": ["checkout", "email"], "alert": 1.5}, "WATCH must be", id="shape"),
    pytest.param({**WATCH, "alert": {**WATCH["alert"], "above": 1.1, "for_seconds": 0}},
                 "would page for an ordinary burst", id="age-1.1-no-hold"),
    pytest.param({**WATCH, "alert": {**WATCH["alert"], "above": 0.5, "for_seconds": 0}},
                 "would page for an ordinary burst", id="noisy"),
])
def test_step3_static_rejections(lab08, stack, watch, hint):
    with pytest.raises(LabCheckFailed, match=hint):
        check_lab08_observability(watch, stack)


# --- step 4 ------------------------------------------------------------------------------------
def test_step4_accepts_the_solution_note(lab08, stack):
    check_lab08_note(NOTE, stack)


@pytest.mark.parametrize("note, hint", [
    pytest.param(cell("labs", "NOTE = ").split('"""')[1], "TODO", id="template"),
    pytest.param(NOTE.replace("result_expires", "results are kept"), "result_expires",
                 id="setting-unnamed"),
    pytest.param(NOTE.replace("## Failures we expect", "## Failures"), "no section",
                 id="heading-changed"),
    pytest.param(NOTE.replace("shop:dead", "the dead letters"), "where to look",
                 id="no-dead-letters"),
    pytest.param(NOTE.replace("A burst of orders", "A large payload").replace(
        "catch up.", "catch up (see the downloads)."), "a burst of orders",
                 id="words-inside-words"),
])
def test_step4_rejects_unfinished_notes(lab08, stack, note, hint):
    with pytest.raises(LabCheckFailed, match=hint):
        check_lab08_note(note, stack)
