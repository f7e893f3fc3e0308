"""celerylab.observe: the figures chapter 7 and lab 7 read, on a real Redis (no workers needed),
and the monitoring processes a stack starts and stops."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from celerylab import observe
from celerylab.processes import pid_alive
from celerylab.recording import SENT_HEADER


def envelope(sent_at: float) -> str:
    return json.dumps({"headers": {SENT_HEADER: sent_at}, "body": ""})


def test_depth_and_oldest_age_count_every_priority_sub_list(stack):
    r, now = stack.redis, time.time()
    assert observe.depth(r, "q") == 0 and observe.oldest_age(r, "q") is None
    r.lpush("q", envelope(now - 1), envelope(now - 0.5))  # the right end is the oldest
    r.lpush("q\x06\x166", envelope(now - 4))
    r.lpush("q\x06\x169", envelope(now - 2))
    r.lpush("qq", envelope(now - 99))  # another queue whose name starts the same
    assert observe.depth(r, "q") == 4
    assert observe.oldest_age(r, "q", now) == pytest.approx(4)


def test_oldest_age_sees_a_requeued_message_on_the_left_end(stack):
    """reject(requeue=True) puts an old message back on the left (kombu restores it leftmost),
    behind younger ones: reading only the right end would call the queue young."""
    r, now = stack.redis, time.time()
    r.lpush("q", envelope(now - 1), envelope(now - 0.5), envelope(now - 30))  # the last: requeued
    assert observe.oldest_age(r, "q", now) == pytest.approx(30)


def test_in_flight_groups_unacked_by_queue(stack):
    r = stack.redis
    for tag, queue in enumerate(["a", "a", "b"]):
        r.hset("unacked", str(tag), json.dumps([{"headers": {}}, "", queue]))
    assert observe.in_flight(r) == {"a": 2, "b": 1}


def sample(t, age):
    return observe.Sample(t, "q", 0, age, 0, 0)


def test_lag_alert_waits_for_its_period_and_clears_at_once():
    rule = observe.LagAlert(above=3, for_seconds=1)
    series = [sample(0, 1), sample(1, 3.5), sample(1.5, 4), sample(2, 4.5), sample(2.5, None),
              sample(3, 5)]
    assert observe.alert_timeline(series, rule) == [False, False, False, True, False, False]


def test_throughput_is_finished_tasks_per_second_over_a_window():
    series = [observe.Sample(t, "q", 0, None, 0, done) for t, done in
              [(0, 0), (0.5, 5), (1.0, 10), (1.5, 10), (2.0, 10)]]
    assert observe.throughput(series, window=1.0) == [0.0, 10.0, 10.0, 5.0, 0.0]


def test_run_load_keeps_its_rate_and_runs_each_action_once():
    sent, ran = [], []
    out = observe.run_load({"q": (sent.append, 20)}, seconds=0.5, actions=[(0.2, lambda: ran.append(1))])
    assert len(sent) == out["sent"]["q"] == 11 and ran == [1]
    assert out["done_at"][0] - out["t0"] >= 0.2


def test_the_sampler_records_depth_and_what_finished(stack):
    r = stack.redis
    with observe.Sampler(r, ["q"], interval=0.05, ping=lambda: 2) as sampler:
        r.lpush("q", envelope(time.time()))
        r.rpush("celerylab:events", json.dumps({"event": "sent", "id": "x", "t": 1, "queue": "q"}),
                json.dumps({"event": "finished", "id": "x", "t": 2}))
        time.sleep(0.3)
    last = sampler.series("q")[-1]
    assert (last.depth, last.done, last.workers_up) == (1, 1, 2)


def test_the_exporter_serves_the_figures_on_loopback(stack):
    stack.redis.lpush("q", envelope(time.time() - 5))
    exporter = observe.Exporter(stack.redis, ["q"]).start()
    try:
        assert exporter.url.startswith("http://127.0.0.1:")
        text = urllib.request.urlopen(exporter.url, timeout=5).read().decode()
    finally:
        exporter.stop()
    assert 'celerylab_queue_depth{queue="q"} 1.0' in text
    age = next(line for line in text.splitlines() if line.startswith("celerylab_queue_oldest"))
    assert float(age.split()[-1]) >= 5


def test_the_rule_file_passes_promtool():
    if observe.promtool_check() is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; .ci/run installs it)")
    assert "SUCCESS" in observe.promtool_check()


def test_flower_and_prometheus_stop_with_the_stack(tasks_module):
    import celerylab
    stack = celerylab.start("observe-test")
    try:
        flower = observe.Flower(stack, tasks_module).start()
        assert flower.api("workers") == {} or isinstance(flower.api("workers"), dict)
        services = [flower.group.pid]
        if observe.Prometheus.available():
            exporter = observe.Exporter(stack.redis, ["q"]).start()
            prometheus = observe.Prometheus(stack, f"127.0.0.1:{exporter.port}").start()
            services.append(prometheus.group.pid)
            exporter.stop()
    finally:
        stack.stop()
    assert not any(pid_alive(pid) for pid in services)


def test_the_dashboard_draws_what_was_sampled(stack):
    sampler = observe.Sampler(stack.redis, ["q"])
    sampler.samples = [observe.Sample(sampler.t0 + i, "q", i, i / 2, 0, 0) for i in range(5)]
    board = observe.Dashboard(sampler, seconds=10, threshold=3)
    board.refresh(4.0)
    assert board.progress.value == 4.0 and "5 samples" in board.label.value
    assert board.drawn == {"q": 5}, "every sample so far is on the figure"


def held(r, tag, queue, delivered, eta=None):
    """A delivery as kombu's QoS.append records it: scored by time, message kept by tag."""
    headers = {"eta": eta} if eta else {}
    r.zadd("unacked_index", {tag: delivered})
    r.hset("unacked", tag, json.dumps([{"headers": headers, "body": ""}, "", queue]))


def test_held_ages_count_from_the_delivery_or_a_later_eta(stack):
    r, now = stack.redis, time.time()
    held(r, "t1", "a", now - 7)
    held(r, "t2", "a", now - 2)
    eta = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now + 60))  # held on purpose
    held(r, "t3", "b", now - 50, eta=eta)
    ages = observe.held_ages(r, now)
    assert ages == {"a": pytest.approx(7), "b": 0.0}, "b is held until its ETA, on purpose"


def test_the_exporter_ages_held_and_unstamped_messages(stack):
    """Celery's defaults: a frozen worker's prefetched messages are held, not waiting (depth 0,
    waiting age 0); a producer without the stamp: its message counted, and aged from the first
    scrape that saw it, so the age still grows."""
    r = stack.redis
    held(r, "t1", "q", time.time() - 6)
    r.lpush("legacy", json.dumps({"headers": {}, "properties": {"delivery_tag": "x"}}))
    exporter = observe.Exporter(r, ["q", "legacy"]).start()
    try:
        def scrape():
            text = urllib.request.urlopen(exporter.url, timeout=5).read().decode()
            return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                    if line.startswith("celerylab_queue")}
        first = scrape()
        time.sleep(0.3)
        second = scrape()
    finally:
        exporter.stop()
    assert first['celerylab_queue_held_oldest_age_seconds{queue="q"}'] >= 6
    assert first['celerylab_queue_oldest_age_seconds{queue="q"}'] == 0.0
    assert second['celerylab_queue_unstamped_messages{queue="legacy"}'] == 1
    assert second['celerylab_queue_oldest_age_seconds{queue="legacy"}'] >= 0.3


def test_the_exporter_fails_its_scrape_when_redis_is_gone(stack):
    """So Prometheus's `up` goes to 0 and the exporter-down rule fires, rather than every
    gauge reading 0 and every other rule staying quiet."""
    import urllib.error

    import redis

    from celerylab.broker import free_port
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    exporter = observe.Exporter(dead, ["q"]).start()
    try:
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(exporter.url, timeout=10)
    finally:
        exporter.stop()
