"""What every lab checker shares: the failure types, the output lines, the learner-call guards.

A checker prints one line per thing it verified and ends with a pass message, or raises
``LabCheckFailed`` with a hint that names the symptom without giving the answer away. In Jupyter the
failure shows as a short message, not a stack trace (``CourseError._render_traceback_``).

Timing verdicts are relative: a checker measures a reference on the same machine in the same run
(a baseline layout, a plain CPU burn) and judges the answer against it. When the reference shows
that the machine cannot show the effect right now, it raises ``MachineTooBusy`` (or, where what
still holds decides the contract, judges that and says the rest could not be shown): it never
blames the answer for the machine's load.
"""

from __future__ import annotations

import functools

from celerylab.errors import CourseError

POOLS = ("prefork", "threads", "solo")


class LabCheckFailed(CourseError, AssertionError):
    """The lab's answer does not do what the lab asks yet; the message is a hint."""


# A check the machine was too busy to judge runs again by itself, up to this many times, before it
# says so (a learner would re-run it anyway). The test suite sets 0: its own loop retries.
BUSY_RETRIES = 2


class MachineTooBusy(LabCheckFailed):
    """The reference measured in this run shows the machine cannot judge the answer right now."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"The machine is too busy to judge this right now: {what}\n"
                         "This says nothing about your answer. Close what else is running "
                         "(another notebook, a build) and run the check again.")


def ok(text: str) -> None:
    print(f"  ok  {text}")


def call_learner(fn, *args, what: str):
    """Call the learner's function; turn a stub or a crash into a hint."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise LabCheckFailed(f"{what} is not written yet: replace the `raise NotImplementedError` "
                             "line with your code, run that cell, then run this check again.") from None
    except LabCheckFailed:
        raise
    except Exception as exc:
        raise LabCheckFailed(f"{what} raised {type(exc).__name__}: {exc}\n"
                             "Run it by hand on the example above to see where it breaks.") from None


def import_answer(name: str):
    """The learner's task module ``name``, imported afresh (its cell may have rewritten it since);
    a stub or a module that does not import is a hint."""
    import importlib
    import sys
    try:
        if name in sys.modules:
            return importlib.reload(sys.modules[name])
        return importlib.import_module(name)
    except NotImplementedError:
        raise LabCheckFailed(f"{name}.py is not written yet: fill in its marked places, run "
                             "that cell, then this check again.") from None
    except Exception as exc:
        raise LabCheckFailed(f"{name}.py does not import: {type(exc).__name__}: {exc}\n"
                             f"Run `import {name}` in a cell to see where it breaks.") from None


def bounded(fn, *args, what: str, limit: float, raises_ok: bool = False):
    """Call the learner's ``fn`` in a thread: (returned value, seconds), or (the thread, None)
    when it is still running after ``limit`` (left to finish on its own). ``raises_ok``: an
    exception counts as having returned (None)."""
    import threading
    import time
    box: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            box["value"] = fn(*args) if raises_ok else call_learner(fn, *args, what=what)
        except LabCheckFailed as exc:
            box["error"] = exc
        except Exception:  # raises_ok only: call_learner turns everything else into a hint
            box["value"] = None
        box["took"] = time.monotonic() - t0

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    if "error" in box:
        raise box["error"]
    if thread.is_alive():
        return thread, None
    return box.get("value"), box["took"]


def call_within(fn, *args, what: str, limit: float):
    """``bounded``, with a call still running after ``limit`` seconds made a hint: never a hang
    of the check."""
    value, took = bounded(fn, *args, what=what, limit=limit)
    if took is None:
        raise LabCheckFailed(f"{what} had not returned after {limit:.0f} s. Does it wait for "
                             "something (a task's result, a lock)? It should do its part and "
                             "return.")
    return value


def checker(fn):
    """Wrap a lab checker: whatever the learner's answer does, the learner sees a hint, never a
    traceback from celerylab. A ``CourseError`` (a hint, or a course message such as a worker that
    did not boot) passes through; anything else is reported as what the answer made go wrong."""

    import inspect
    signature = inspect.signature(fn)

    def attempt(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CourseError:
            raise
        except Exception as exc:
            raise LabCheckFailed(
                f"The check could not go on: {type(exc).__name__}: {exc}\n"
                "Something your answer returned or did was not of the shape the lab describes "
                "(a value of another type, a missing key, a message that is not JSON?). Compare "
                "it with the lab's description, then run the check again.") from None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise CourseError(f"{fn.__name__}{signature} was called with the wrong arguments "
                              f"({exc}): run the check cell as the lab wrote it.") from None
        stack = bound.arguments.get("stack")
        if stack is None or getattr(stack, "stopped", False) or not getattr(stack, "url", ""):
            raise CourseError("This notebook's stack is not running (the notebook's last cell "
                              "stops it). Re-run the setup cell near the top "
                              "(stack = celerylab.start(...)), then this check.")
        for n in range(BUSY_RETRIES + 1):
            try:
                return attempt(*args, **kwargs)
            except MachineTooBusy as exc:
                if n >= BUSY_RETRIES:
                    raise
                print(f"  ..  the machine was too busy to judge ({exc.what.splitlines()[0]:.160})"
                      f"; checking again ({n + 1} of {BUSY_RETRIES})")
        raise AssertionError("unreachable")

    return run
