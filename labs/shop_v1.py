"""The checkout flow as it shipped: order -> charge -> receipt e-mail."""

import os

import redis
from celery import Celery

from celerylab.capstone import Mailer, PaymentAPI

BROKER = os.environ["CELERYLAB_BROKER_URL"]

app = Celery("shop_v1", broker=BROKER, backend=BROKER)
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
db = redis.Redis.from_url(BROKER)
payments = PaymentAPI(db)
mailer = Mailer(db)


def submit_order(order):
    """The producer: the web app calls this when a customer presses "Pay"."""
    return place_order.delay(order)


@app.task(acks_late=True)  # added after an incident, "so that we never lose an order"
def place_order(order):
    payments.charge(order["id"], order["total_cents"])
    db.hset("shop:orders", order["id"], "paid")
    send_receipt.delay(order["id"], order["email"])


@app.task
def send_receipt(order_id, email):
    mailer.send(order_id, email)
