"""Task code the lab checkers run on the learner's workers (importable by any worker)."""

import os
import time

from celery import Celery

app = Celery("workloads", broker=os.environ.get("CELERYLAB_BROKER_URL"),
             backend=os.environ.get("CELERYLAB_BROKER_URL"))
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                task_acks_late=False, worker_prefetch_multiplier=1,
                broker_connection_retry_on_startup=True)


@app.task
def crunch(n):
    """CPU-bound: pure Python arithmetic (holds the GIL)."""
    return sum(i * i for i in range(n)) % 7


@app.task
def wait_io(seconds):
    """I/O-bound: waits, as on a network call."""
    time.sleep(seconds)


_hoard = []


@app.task
def lookup(x):
    """Latency-sensitive: a user waits for it."""
    return x


@app.task
def render_report(seconds):
    """Slow."""
    time.sleep(seconds)


@app.task
def import_catalog(mb):
    """Memory-hungry: keeps `mb` MiB in the child that runs it."""
    _hoard.append(bytearray(b"\x01") * (mb * 1024 * 1024))
    return os.getpid()


@app.task
def hold(seconds):
    """Lab 6: waits ``seconds`` (long or short work); acknowledged early, when it starts."""
    time.sleep(seconds)


@app.task(acks_late=True)
def hold_late(seconds):
    """Lab 6: the same, acknowledged late (after it returns)."""
    time.sleep(seconds)
