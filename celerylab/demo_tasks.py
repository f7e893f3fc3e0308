"""Tasks for the default worker of docker-compose.yml (a worker to poke at from a notebook)."""

import os
import time

from celery import Celery

BROKER = os.environ.get("CELERYLAB_BROKER_URL") or os.environ.get("REDIS_URL",
                                                                  "redis://127.0.0.1:6379/0")
app = Celery("demo_tasks", broker=BROKER, backend=BROKER)
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                result_expires=3600, broker_connection_retry_on_startup=True)


@app.task
def add(x, y):
    return x + y


@app.task
def send_receipt(order_id):
    time.sleep(0.2)
    return f"receipt for order {order_id} sent"
