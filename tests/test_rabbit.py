"""The RabbitMQ lessons say clearly when RabbitMQ is not there, and run where it is."""

import os
import socket

import pytest

from celerylab.rabbit import rabbitmq_status


def test_unreachable_rabbitmq_is_said_clearly(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RABBITMQ_URL", f"amqp://guest:guest@127.0.0.1:{port}//")
    reachable, message = rabbitmq_status()
    assert not reachable
    assert "not reachable" in message and "will skip" in message and "RABBITMQ_URL" in message


@pytest.mark.skipif(not os.environ.get("CI"), reason="only CI promises a RabbitMQ")
def test_rabbitmq_is_reachable_in_ci():
    from conftest import CI_SERVICES
    assert "rabbitmq" in CI_SERVICES, "the workflow is checked against CI_SERVICES"
    reachable, message = rabbitmq_status()
    assert reachable, f"chapter 5's RabbitMQ lesson would skip in CI: {message}"
