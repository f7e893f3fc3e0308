"""Progressive hints for every lab: ``hint("lab03")`` prints the next one (three in all, each more
specific than the last, none the answer); ``hint("lab03", 2)`` a given one; ``hint_button("lab03")``
the same behind a button. A test checks that no hint contains a line of any solution's code.
"""

from __future__ import annotations

HINTS: dict[str, list[str]] = {
    "lab01": [
        "A queue is one or more Redis lists. Which list commands read without removing anything?",
        "Read every list of the queue: its bare name and its three priority sub-lists. A worker "
        "takes from the right end of a list, and from the bare list before any sub-list.",
        "Each item is a JSON envelope. The arguments are in `body` (base64 of JSON: args, kwargs "
        "and one more item); `task`, `id`, `retries` and `eta` are in `headers`. Walk each list "
        "from its right end to its left end, bare list first, then steps 3, 6 and 9.",
    ],
    "lab02": [
        "Two kinds of work want two kinds of pool: which pool gives CPU-bound work more than one "
        "core, and which one lets many waiting tasks overlap cheaply?",
        "Route each kind of work to its own worker (two workers, each consuming one queue). For "
        "the CPU-bound worker, how many processes can run at the same moment on this machine?",
        "CPU-bound: processes, as many as the cores. I/O-bound: sixty tasks that only wait finish "
        "in about one task's time when about sixty of them can wait at once; chapter 2's "
        "throughput table shows which pool does that without a process per task.",
    ],
    "lab03": [
        "The lookups wait behind slow work: where do they wait, and who else takes from there?",
        "Give each kind of work its own queue, and the lookups a worker that serves nothing else. "
        "Split the budget by what each kind needs, not evenly.",
        "Imports keep 150 MiB in the process that ran them: a worker setting replaces a child "
        "after a task once it has grown past a size (chapter 2). Run one import at a time there.",
    ],
    "lab04": [
        "List the ways one payment can run: twice at once, once more after a crash, once more "
        "much later. Which of them does the acknowledgement mode decide, and which not?",
        "A pool process can die mid-payment while its worker lives on: chapter 4's table shows "
        "which task options make the worker give that message another chance.",
        "Remember each payment id, and credit the account in the same atomic step that records "
        "the id (one Redis command, a Lua script, or a transaction that runs all or nothing), "
        "kept at least as long as a redelivery can take.",
    ],
    "lab05": [
        "Which of the dependency's errors can a later attempt fix? Retry only those, and let "
        "Celery compute the waits (chapter 5's autoretry options).",
        "Growing waits, a cap and jitter are three options; the check reads them and measures "
        "them. For the dead letters: some failures kill the process that ran the task. What "
        "runs, and where, when that happens?",
        "Chapter 5 builds its dead-letter queue on a signal the worker's main process sends too. "
        "For the replay: letters pushed on one end come out oldest first from the other end; "
        "count them before you start, so letters that fail again wait for the next replay.",
    ],
    "lab06": [
        "Where do the short tasks wait while a worker's children are all busy with long tasks?",
        "A busy worker should hold nothing it cannot start now, so that an idle worker can take "
        "it from Redis. Which settings decide what a busy worker holds (chapter 6's table)?",
        "Chapter 6's table counts, for each setting, what a worker holds beside its two running "
        "tasks. Find the rows where that is nothing, and ask why the running tasks count "
        "against the limit in those rows and not in the others.",
    ],
    "lab07": [
        "Depth says how much waits; what says how long the oldest has waited? Read both without "
        "removing anything.",
        "A queue's oldest message is at the right end of one of its lists (bare list and priority "
        "sub-lists); its publish time is in its headers. For the alert: a burst drains by itself "
        "within about 2 s, a stall keeps getting older.",
        "Fire when the oldest age has stayed above a threshold for a short while (a few readings), "
        "and stop firing as soon as it is below again; pick the threshold between what a burst "
        "reaches and what a stall reaches within the 6 s the check allows.",
    ],
    "lab09": [
        "Take the faults one at a time, as the check reports them. Chapter 9 counted what each "
        "did to running orders, to a publish and to a worker: which of its settings and "
        "patterns answers the one you are on?",
        "A message can arrive twice, so the effect must recognise an order it already shipped "
        "(chapter 4's tools). A request must never wait on the broker for long: bound every "
        "read and every retry, and keep what could not be sent in a store of its own. A worker "
        "that answers ping proves only its control channel.",
        "Bound every wait on the broker: reads, connects, and the publish's own retrying "
        "(chapter 9 measured what `retry=False` does and does not bound). The outbox outlives "
        "the broker and this process, and forgets an order only once it was sent. The probe "
        "asks for work, not for an answer. The reconnect bound follows kombu's schedule to its "
        "end.",
    ],
    "lab08": [
        "Take the incidents one at a time, in the order the final check reports them. For each, "
        "ask which of chapters 1-7 it belongs to: acknowledgement and crashes (4), retries and "
        "dead letters (5), routing (3), prefetch (6), lag (7).",
        "A double charge and a lost order pull in opposite directions: making sure a message "
        "comes back after a crash means it can run twice, so the charge must be safe to repeat. "
        "The payment provider's `charge` has a parameter made for that. Poison orders: which "
        "signal does Celery send whenever a task fails for good, whether it raised or its "
        "process died?",
        "Checkouts wait behind e-mails when both share a queue or a worker: route the receipt "
        "task elsewhere, and give each queue its own worker within the budget. The alert: its "
        "threshold sits between what the checkout queue's lag reaches during a burst and what "
        "it reaches within the 4 s stall; ask it to hold for a reading or two.",
    ],
    "lab10": [
        "Take the orders one at a time, as the check reports them. Chapter 10 counted what a "
        "failing step, a retrying step, a crash and a lost chord each do to a workflow: which "
        "of them is your order meeting?",
        "Every step can run twice (a retry, a redelivery): the partners act once per key, if the "
        "key is the same each time. An error that will never go away must end the order; one "
        "that may go away is worth another try, later. A receipt must know that every "
        "shipment succeeded.",
        "Some failures call no error callback at all: a process killed, a chord whose state is "
        "gone. Only a look from outside, at orders older than a deadline with no outcome, finds "
        "them; remember when each order was placed. A crash is survived by the acknowledgement "
        "mode that gives a running step back.",
    ],
}

_given: dict[str, int] = {}


def hint(lab: str, level: int | None = None) -> str:
    """Print (and return) the next hint for ``lab`` ("lab03"), or hint number ``level`` (1-3)."""
    hints = HINTS.get(lab)
    if hints is None:
        raise ValueError(f"no hints for {lab!r}; labs: {', '.join(sorted(HINTS))}")
    if level is None:
        level = min(_given.get(lab, 0) + 1, len(hints))
    if not 1 <= level <= len(hints):
        raise ValueError(f"{lab} has hints 1 to {len(hints)}")
    _given[lab] = max(_given.get(lab, 0), level)
    more = "" if level == len(hints) else f"  (hint({lab!r}) again for hint {level + 1})"
    text = f"Hint {level} of {len(hints)}: {hints[level - 1]}{more}"
    print(text)
    return text


def hint_button(lab: str):
    """A button that shows the next hint each time it is pressed."""
    import contextlib
    import io

    import ipywidgets as w

    button = w.Button(description="next hint", icon="lightbulb-o")
    out = w.Output()

    def on_click(_):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            hint(lab)
        with out:
            print(buffer.getvalue(), end="")
        if _given.get(lab, 0) >= len(HINTS[lab]):
            button.disabled = True
            button.description = "no more hints"

    button.on_click(on_click)
    return w.VBox([button, out])
