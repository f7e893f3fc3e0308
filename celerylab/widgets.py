"""Small ipywidgets controls. Their logic is in plain functions, which the tests call directly."""

from __future__ import annotations

import json


def send_and_inspect(task, r, n: int, queue: str = "celery") -> dict:
    """Publish ``n`` messages of ``task`` (args ``(i, i)``) to ``queue``; report what Redis holds."""
    ids = [task.apply_async((i, i), queue=queue).id for i in range(n)]
    newest = r.lindex(queue, 0)
    oldest = r.lindex(queue, -1)
    return {"sent": len(ids), "depth": r.llen(queue),
            "oldest id": json.loads(oldest)["headers"]["id"] if oldest else None,
            "newest id": json.loads(newest)["headers"]["id"] if newest else None,
            "ids": ids}


def purge(r, queue: str = "celery") -> int:
    """Delete a queue's list (only messages of this notebook's broker); return how many it held."""
    depth = r.llen(queue)
    r.delete(queue)
    return depth


def queue_explorer(task, r, queue: str = "celery"):
    """A slider and two buttons: send N messages (no worker consumes them) or purge the queue."""
    import ipywidgets as w

    count = w.IntSlider(value=5, min=1, max=50, description="messages")
    send, empty = w.Button(description="send"), w.Button(description="purge queue")
    out = w.Output()

    def show(text: str) -> None:
        out.clear_output()
        with out:
            print(text)

    def on_send(_):
        report = send_and_inspect(task, r, count.value, queue)
        show(f"sent {report['sent']}; LLEN {queue} = {report['depth']}\n"
             f"next out (right end, LINDEX -1): {report['oldest id']}\n"
             f"last in  (left end,  LINDEX 0):  {report['newest id']}")

    send.on_click(on_send)
    empty.on_click(lambda _: show(f"deleted {purge(r, queue)} messages from {queue!r}"))
    return w.VBox([w.HBox([count, send, empty]), out])
