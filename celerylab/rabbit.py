"""RabbitMQ, for the lessons that use it: reachable at its usual URL, or said clearly that it is not."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672//"


def rabbitmq_url() -> str:
    return os.environ.get("RABBITMQ_URL", DEFAULT_URL)


def rabbitmq_status(timeout: float = 1.0) -> tuple[bool, str]:
    """(reachable, message). Only opens a TCP connection: no queue is touched."""
    url = rabbitmq_url()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5672
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, f"RabbitMQ reachable at {host}:{port}"
    except OSError as exc:
        return False, (f"RabbitMQ not reachable at {host}:{port} ({exc}); the RabbitMQ lessons "
                       "will skip. Start one (docker compose --profile rabbitmq up) or set "
                       "RABBITMQ_URL.")
