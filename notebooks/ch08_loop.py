"""An order too big for its worker: the OOM killer takes its process every time."""

import os
import signal

import redis
from celery import Celery, signals

BROKER = os.environ["CELERYLAB_BROKER_URL"]

app = Celery("ch08_loop", broker=BROKER, backend=BROKER)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,  # lab 8's settings: a lost process gives its message back ...
    task_reject_on_worker_lost=True,  # ... and a killed pool process too
    worker_prefetch_multiplier=1,
    task_default_queue="heavy",
    broker_connection_retry_on_startup=True,
)


@signals.task_prerun.connect
def count_attempt(task_id=None, **_):
    """The detector: attempts per task id, counted where the task starts."""
    redis.Redis.from_url(BROKER).hincrby("attempts", task_id, 1)


@app.task
def heavy_order(order_id):
    os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does, on every attempt
