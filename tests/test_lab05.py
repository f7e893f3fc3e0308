"""Lab 5 (retries and dead letters): the checker accepts right answers and rejects wrong ones,
with a busy-loop process beside the solution and the other answers judged side by side
(conftest.side_by_side; the soak: beside all of it).

Variants rejected by the static part of the check (import, cap, retry budget) fail before any
worker starts; the others run the whole live check (a worker, real retries that wait real seconds).
"""

from __future__ import annotations

import json

import nbformat
import pytest
from conftest import ROOT, assert_verdict, solution_function

from celerylab.checks import LabCheckFailed, MachineTooBusy, check_lab05
from celerylab.workers import Worker

pytestmark = pytest.mark.usefixtures("hog")

LAB = "lab05_retries_and_dead_letters"


def module_code(folder: str = "solutions", changes=()) -> str:
    nb = nbformat.read(ROOT / folder / f"{LAB}.ipynb", as_version=4)
    code = next(c.source for c in nb.cells
                if c.source.startswith("%%writefile lab05_tasks.py")).split("\n", 1)[1]
    for old, new in changes:
        assert old in code, old
        code = code.replace(old, new)
    return code


# --- replays: the solution's, and variants of it ----------------------------------------------
def replay_original_id(r, send_task):
    """Correct but unusual: re-send under the task's original id (the backend still says FAILURE
    for that id when the replay starts)."""
    out = []
    for raw in reversed(r.lrange("lab05:dead", 0, -1)):
        letter = json.loads(raw)
        out.append(send_task(letter["task"], args=letter["args"], kwargs=letter["kwargs"],
                             task_id=letter["id"]))
    r.delete("lab05:dead")
    return out


def replay_lpop(r, send_task):
    """Correct for letters RPUSHed (oldest on the left); returns task ids, not results."""
    ids = []
    for _ in range(r.llen("lab05:dead")):
        letter = json.loads(r.lpop("lab05:dead"))
        ids.append(send_task(letter["task"], letter["args"], letter["kwargs"]).id)
    return ids


def replay_without_kwargs(r, send_task):
    out = []
    for _ in range(r.llen("lab05:dead")):  # bounded: its own re-failing letters come back
        letter = json.loads(r.rpop("lab05:dead"))
        out.append(send_task(letter["task"], letter["args"]))
    return out


def replay_first_arg(r, send_task):
    out = []
    for _ in range(r.llen("lab05:dead")):  # bounded: its own re-failing letters come back
        letter = json.loads(r.rpop("lab05:dead"))
        out.append(send_task(letter["task"], (letter["args"][0],), letter["kwargs"]))
    return out


def replay_newest_first(r, send_task):
    out = [send_task(json.loads(raw)["task"], json.loads(raw)["args"], json.loads(raw)["kwargs"])
           for raw in r.lrange("lab05:dead", 0, -1)]
    r.delete("lab05:dead")
    return out


def replay_count(r, send_task):
    n = 0
    for _ in range(r.llen("lab05:dead")):
        letter = json.loads(r.rpop("lab05:dead"))
        send_task(letter["task"], letter["args"], letter["kwargs"])
        n += 1
    return n


def replay_drops_one(r, send_task):
    """Reads all but the last-read (newest) letter, deletes the list: one letter is lost."""
    raws = r.lrange("lab05:dead", 1, -1)[::-1]
    r.delete("lab05:dead")
    return [send_task(x["task"], x["args"], x["kwargs"]) for x in map(json.loads, raws)]


def replay_results_reversed(r, send_task):
    out = []
    for _ in range(r.llen("lab05:dead")):
        letter = json.loads(r.rpop("lab05:dead"))
        out.append(send_task(letter["task"], letter["args"], letter["kwargs"]))
    return out[::-1]


def replay_stub(r, send_task):
    raise NotImplementedError


REPLAYS = {f.__name__: f for f in (replay_original_id, replay_lpop, replay_without_kwargs,
                                   replay_first_arg, replay_newest_first, replay_count,
                                   replay_drops_one, replay_results_reversed, replay_stub)}

POLICY_LINES = ('"retry_backoff": True,  # 1, 2, 4 ... s', '"retry_backoff_max": 2,')
UNUSUAL_POLICY = (  # factor 2, cap 4, two retries: waits within 2 then 4 s; letters RPUSHed;
    # a killed child retried like an exception (Celery 5.7), which its last attempt cannot be
    (POLICY_LINES[0], '"retry_backoff": 2.7,  # int(2.7) = 2: 2, 4 s'),
    (POLICY_LINES[1], '"retry_backoff_max": 4,'),
    ('"max_retries": 3', '"max_retries": 2, "retry_on_worker_lost": True'),
    ("db.lpush(DEAD_LETTERS", "db.rpush(DEAD_LETTERS"),
)

SIGNAL_HANDLER = "@signals.task_failure.connect\ndef dead_letter("
ON_FAILURE_ONLY = (  # the tempting answer: Task.on_failure, which never runs in a killed child
    ("BASE = app.Task\n", '''class DeadLetterOnFailure(app.Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo):
        db.lpush(DEAD_LETTERS, json.dumps({
            "task": self.name, "id": task_id, "args": list(args), "kwargs": kwargs,
            "error": f"{type(exc).__name__}: {exc}", "attempts": self.request.retries + 1}))


BASE = DeadLetterOnFailure
'''),
    (SIGNAL_HANDLER, "def dead_letter("),  # the signal handler no longer connected
)


def run_check(replay, stack, tries: int = 2) -> None:
    """check_lab05, tried again when the checker's own reference says the machine is too busy
    (never a verdict on the answer)."""
    for attempt in range(tries):
        try:
            return check_lab05(replay, stack)
        except MachineTooBusy:
            if attempt == tries - 1:
                pytest.skip("the machine was too busy to judge, twice in a row")


@pytest.fixture
def lab05(stack, tmp_path, monkeypatch):
    """Write a variant of the task module where the checker (and its worker) import it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(code: str):
        (tmp_path / "lab05_tasks.py").write_text(code)
        return stack
    return write


SOLUTION_REPLAY = "solution"


def judge(stack, folder, changes=(), replay=SOLUTION_REPLAY, **_):
    """One answer's live check (conftest.judge_here): its task module, its replay."""
    (folder / "lab05_tasks.py").write_text(module_code(changes=changes))
    check_lab05(replay_named(replay), stack)


def replay_named(name: str):
    if name == SOLUTION_REPLAY:
        return solution_function(LAB, "replay_dead_letters")
    return REPLAYS[name]


@pytest.mark.parametrize("changes, replay", [
    ((), SOLUTION_REPLAY),
    ((), "replay_original_id"),
    (UNUSUAL_POLICY, "replay_lpop"),
], ids=["solution", "replay-with-original-id", "factor2-cap4-rpush-lpop"])
def test_lab05_accepts(verdict, changes, replay):
    out = assert_verdict(verdict, None)
    assert "Lab 5 passed" in out
    assert "grow from retry to retry" in out


@pytest.mark.parametrize("changes, hint", [
    ((('"retry_backoff_max": 2', '"retry_backoff_max": 600'),),
     "reach 600 s, longer than the 4 s"),
    ((("\"retry_backoff\": True,", "\"retry_backoff\": False,"),),
     "reach 180 s, longer than the 4 s"),
    ((('"max_retries": 3', '"max_retries": 1'),), "allow 2 to 5 retries"),
    ((('"max_retries": 3', '"max_retries": None'),), "allow 2 to 5 retries"),
], ids=["cap-600", "no-backoff-default-delay", "one-retry", "retry-forever"])
def test_lab05_static_rejections_fail_fast(lab05, changes, hint, monkeypatch):
    stack = lab05(module_code(changes=changes))
    started = []
    # every worker start goes through Worker.start (stack.start_workers too): record, start none
    monkeypatch.setattr(Worker, "start", lambda self, *a, **k: started.append(self) or self)
    with pytest.raises(LabCheckFailed, match=hint):
        run_check(replay_named(SOLUTION_REPLAY), stack)
    assert not started, "a static rejection should not start a worker (nor wait for retries)"


def test_lab05_unsolved_stub_fails_at_import(lab05):
    stack = lab05(module_code("labs"))
    with pytest.raises(LabCheckFailed, match="still has a `raise NotImplementedError`"):
        run_check(replay_stub, stack)


ON_RETRY_LETTER = '''class LetterOnRetry(app.Task):
    def on_retry(self, exc, task_id, args, kwargs, einfo):
        db.lpush(DEAD_LETTERS, json.dumps({
            "task": self.name, "id": task_id, "args": list(args), "kwargs": kwargs,
            "error": repr(exc), "attempts": self.request.retries + 1}))


BASE = LetterOnRetry
'''


STRETCHED_RETRY = """class Stretched(app.Task):
    def retry(self, *args, countdown=None, **kwargs):  # waits 2 s more than the policy says
        return super().retry(*args, countdown=(countdown or 0) + 2, **kwargs)


BASE = Stretched
"""


@pytest.mark.parametrize("changes, replay, hint", [
    # a constant wait: factor 1 capped at 1 s (every wait 0 or 1 s), or a fixed countdown
    ((('"retry_backoff_max": 2', '"retry_backoff_max": 1'),), SOLUTION_REPLAY, "did not grow"),
    ((('"retry_backoff": True,', '"retry_backoff": False, "retry_kwargs": {"countdown": 1},'),),
     SOLUTION_REPLAY, "did not grow"),
    ((('"retry_jitter": True', '"retry_jitter": False'),), SOLUTION_REPLAY, "in lockstep"),
    ((("BASE = app.Task\n", STRETCHED_RETRY),), SOLUTION_REPLAY,
     r"Retry \d of [\w-]+ waited [\d.]+ s; the policy you declared allows at most"),
    ((('"autoretry_for": (DependencyDown,)', '"autoretry_for": (DependencyDown, InvalidOrder)'),),
     SOLUTION_REPLAY, r"malformed order \(InvalidOrder\): it ran [2-9] times"),
    ((('"autoretry_for": (DependencyDown,)', '"autoretry_for": ()'),), SOLUTION_REPLAY,
     r"flaky-\d+ ended FAILURE after 1 attempt.*transient failure should succeed"),
    (((SIGNAL_HANDLER, "def dead_letter("),), SOLUTION_REPLAY, "no dead letter appeared"),
    (ON_FAILURE_ONLY, SOLUTION_REPLAY,
     r"crash-1 failed for good \(WorkerLostError.*no dead letter.*process running it was killed"),
    ((('"max_retries": 3', '"max_retries": 3, "reject_on_worker_lost": True, "acks_late": True'),),
     SOLUTION_REPLAY, "delivered again and again"),
    ((('"kwargs": kwargs or {},', ""),), SOLUTION_REPLAY, "A dead letter has no kwargs"),
    ((("BASE = app.Task\n", ON_RETRY_LETTER),), SOLUTION_REPLAY,
     "which did not fail for good"),
    ((), "replay_without_kwargs", r"changed the payload.*kwargs=\{\}"),
    ((), "replay_first_arg", r"changed the payload.*replay sent .*args=\['bad-1'\], "),
    ((), "replay_newest_first",
     r"in the order \['bad-2', 'crash-1', 'down-1', 'bad-1'\].*oldest first"),
    ((), "replay_count", "replay_dead_letters returned int"),
    ((), "replay_drops_one", r"sent 3 messages; the dead-letter list held 4: \w+-\d was not"),
    ((), "replay_results_reversed", "but not in the order it sent them"),
    ((), "replay_stub", "replay_dead_letters is not written yet"),
], ids=["constant-1s-jittered", "fixed-countdown", "jitter-off", "waits-longer-than-declared",
        "invalid-retried", "transient-not-retried", "no-dead-letter", "on-failure-misses-crash",
        "requeued-poison-loop", "letter-without-kwargs",
        "letters-on-retry", "replay-drops-kwargs", "replay-first-arg-only", "replay-newest-first",
        "replay-returns-count", "replay-drops-a-letter", "replay-results-reversed",
        "replay-stub"])
def test_lab05_rejects(verdict, changes, replay, hint):
    assert_verdict(verdict, hint)
