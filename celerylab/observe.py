"""What to watch on a Celery + Redis stack, read live: depth, in flight, oldest age, throughput.

Chapter 7 and lab 7 use it; every figure is read from Redis (or from the course's recording of
Celery's signals), never computed from a model:

    depth        LLEN of the queue's list plus its priority sub-lists (``q\\x06\\x16<step>``)
    in flight    messages a worker took and has not acknowledged (the ``unacked`` hash)
    oldest age   now minus the publish stamp of the oldest waiting message (``LINDEX`` of both
                 ends of each list)
    held age     now minus the delivery time of the oldest message a worker holds unacknowledged
                 (kombu's ``unacked_index``), or its ETA when later
    done         tasks finished so far (the recording's ``finished`` events), for throughput
    workers up   workers answering a ping within a short timeout

``Sampler`` records them in the background while load runs; ``LagAlert`` is a rule like a
Prometheus alert (a condition that must hold ``for`` a while before it fires). ``Exporter``,
``Flower`` and ``Prometheus`` are the production tools, started on loopback ports and stopped with
the notebook's stack.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from celerylab.broker import free_port
from celerylab.errors import CourseError
from celerylab.processes import ProcessGroup
from celerylab.recording import EVENTS, SENT_HEADER

SEP = "\x06\x16"  # kombu's separator: priority sub-lists are named q + SEP + step
PRIORITY_STEPS = (3, 6, 9)  # step 0 is the bare queue list
RULES_FILE = Path(__file__).parent / "monitoring" / "celerylab-alerts.yml"


# --- reading one queue ---------------------------------------------------------------------------
def queue_lists(queue: str) -> list[str]:
    """The Redis lists that hold a queue's waiting messages, highest priority first."""
    return [queue] + [f"{queue}{SEP}{step}" for step in PRIORITY_STEPS]


def depth(r, queue: str) -> int:
    """Messages waiting in the queue: every priority sub-list counts."""
    pipe = r.pipeline(transaction=False)
    for name in queue_lists(queue):
        pipe.llen(name)
    return sum(pipe.execute())


def _ends(r, queue: str) -> dict[str, float | None]:
    """The messages at both ends of each of the queue's lists (where the oldest can be), by
    delivery tag: the publish stamp of each, or None for a message without one."""
    pipe = r.pipeline(transaction=False)
    for name in queue_lists(queue):
        pipe.lindex(name, -1)
        pipe.lindex(name, 0)
    found: dict[str, float | None] = {}
    for raw in pipe.execute():
        if raw is None:
            continue
        try:
            message = json.loads(raw)
            stamp = message.get("headers", {}).get(SENT_HEADER)
            tag = str(message.get("properties", {}).get("delivery_tag") or hash(raw))
        except (ValueError, AttributeError):
            continue
        found[tag] = None if stamp is None else float(stamp)
    return found


def oldest_age(r, queue: str, now: float | None = None) -> float | None:
    """Seconds the oldest waiting message has waited (None when the queue is empty).

    Producers push on the left (kombu's ``Channel._put``: LPUSH) and workers pop from the right,
    so ``LINDEX list -1`` is the oldest message published; but a message put back by
    ``reject(requeue=True)`` goes back on the left, behind everything waiting
    (``QoS.reject`` restores it ``leftmost``, ``kombu/transport/redis.py``), old as it is. So both
    ends are read and the older counts (a message requeued into the middle of a long list by
    several rejects is still missed: reading every message costs O(depth)). The oldest of the
    queue is the oldest of its lists. Celery's message has no publish time: the age comes from
    the ``celerylab_sent_at`` header the course's recorder stamps on every message."""
    stamps = [stamp for stamp in _ends(r, queue).values() if stamp is not None]
    return None if not stamps else (now or time.time()) - min(stamps)


def held_ages(r, now: float | None = None, limit: int = 1000) -> dict[str, float]:
    """Per routing key, how long the oldest message a worker holds unacknowledged has been held.

    Kombu scores each delivery in the ``unacked_index`` sorted set with its time and keeps the
    message in the ``unacked`` hash (``QoS.append``, ``kombu/transport/redis.py``): reserved,
    prefetched and ETA messages under early ack, running tasks too under ``acks_late``. A frozen
    worker's messages stay there, invisible to depth and to the waiting age. A message with an
    ETA counts from its ETA (held on purpose until then). The ``limit`` oldest deliveries are
    read."""
    now = now or time.time()
    scored = r.zrange("unacked_index", 0, limit - 1, withscores=True)
    if not scored:
        return {}
    ages: dict[str, float] = {}
    for (_tag, delivered), raw in zip(scored, r.hmget("unacked", [t for t, _ in scored]),
                                      strict=True):
        try:
            message, _exchange, routing_key = json.loads(raw)
            eta = (message.get("headers") or {}).get("eta")
            due = datetime.fromisoformat(eta) if eta else None
            if due is not None and due.tzinfo is None:  # a naive eta: Celery reads it as UTC
                due = due.replace(tzinfo=UTC)
            since = max(delivered, due.timestamp()) if due else delivered
        except (TypeError, ValueError, AttributeError):  # acked meanwhile, or not kombu's
            continue
        ages[routing_key] = max(ages.get(routing_key, 0.0), now - since)
    return ages


def in_flight(r) -> dict[str, int]:
    """Unacknowledged messages per routing key, from kombu's ``unacked`` hash (each entry keeps
    the message, its exchange and its routing key, not the queue it came from; with Celery's
    default direct routing the routing key is the queue's name, as everywhere in this course)."""
    counts: dict[str, int] = {}
    for raw in r.hvals("unacked"):
        try:
            _message, _exchange, routing_key = json.loads(raw)
        except ValueError:
            continue
        counts[routing_key] = counts.get(routing_key, 0) + 1
    return counts


class DoneCounter:
    """Tasks finished per queue, read incrementally from the recording (cheap to call often)."""

    def __init__(self, r) -> None:
        self.r = r
        self.pos = 0
        self.queue_of: dict[str, str] = {}
        self.started: dict[str, float] = {}
        self.done: dict[str, int] = {}
        self.runtimes: list[tuple[str, float]] = []  # (queue, seconds), in finishing order

    def update(self) -> dict[str, int]:
        raws = self.r.lrange(EVENTS, self.pos, -1)
        self.pos += len(raws)
        for raw in raws:
            e = json.loads(raw)
            if e["event"] == "sent" and e.get("queue"):
                self.queue_of[e["id"]] = e["queue"]
            elif e["event"] == "started":
                self.started[e["id"]] = e["t"]
            elif e["event"] == "finished":
                queue = self.queue_of.get(e["id"], "?")
                self.done[queue] = self.done.get(queue, 0) + 1
                if e["id"] in self.started:
                    self.runtimes.append((queue, e["t"] - self.started[e["id"]]))
        return dict(self.done)


@dataclass
class Sample:
    t: float
    queue: str
    depth: int
    oldest_age: float | None
    in_flight: int
    done: int
    workers_up: int | None = None


def take_sample(r, queues, counter: DoneCounter, workers_up: int | None = None) -> list[Sample]:
    now = time.time()
    flying = in_flight(r)
    done = counter.update()
    return [Sample(now, q, depth(r, q), oldest_age(r, q, now), flying.get(q, 0), done.get(q, 0),
                   workers_up) for q in queues]


class Sampler:
    """Samples ``queues`` every ``interval`` seconds in a background thread.

        with Sampler(stack.redis, ["celery"]) as s:
            ...                      # run load
        s.series("celery")           # the samples of one queue, oldest first
    """

    def __init__(self, r, queues, interval: float = 0.2, ping=None, on_sample=None) -> None:
        self.r, self.queues, self.interval = r, list(queues), interval
        self.ping = ping  # optional: a function returning how many workers answer
        self.workers_up: int | None = None  # its latest answer (pinged in a thread of its own,
        # since a frozen worker makes a ping wait its whole timeout)
        self.pings: list[tuple[float, int]] = []  # (when each ping was sent, its answer): a
        # sample carries the latest answer, which a busy machine can deliver late
        self.on_sample = on_sample  # optional: called with each batch (a live dashboard)
        self.samples: list[Sample] = []
        self.counter = DoneCounter(r)
        self.counter.update()  # only what finishes from now on counts
        self.counter.done.clear()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._pinger = threading.Thread(target=self._ping, daemon=True)
        self.t0 = time.time()
        self.error: BaseException | None = None

    def _ping(self) -> None:
        while not self._stop.is_set():
            sent = time.time()
            try:
                self.workers_up = self.ping()
            except Exception as exc:
                self.error = exc
                return
            self.pings.append((sent, self.workers_up))
            self._stop.wait(self.interval)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                batch = take_sample(self.r, self.queues, self.counter, self.workers_up)
                self.samples.extend(batch)
                if self.on_sample:
                    self.on_sample(batch)
            except Exception as exc:  # shown by stop(), not lost in a thread
                self.error = exc
                return
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def start(self) -> Sampler:
        if self.ping:
            self.workers_up = self.ping()
            self._pinger.start()
        self._thread.start()
        return self

    def stop(self) -> Sampler:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.ping:
            self._pinger.join(timeout=5)
        if self.error:
            raise CourseError(f"The sampler stopped: {type(self.error).__name__}: {self.error}")
        return self

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def series(self, queue: str) -> list[Sample]:
        return [s for s in self.samples if s.queue == queue]


def throughput(series: list[Sample], window: float = 1.0) -> list[float]:
    """Tasks finished per second over the last ``window`` seconds, at each sample."""
    out = []
    for i, s in enumerate(series):
        j = i
        while j > 0 and s.t - series[j - 1].t <= window:
            j -= 1
        span = s.t - series[j].t
        out.append((s.done - series[j].done) / span if span > 0 else 0.0)
    return out


# --- alerting --------------------------------------------------------------------------------
@dataclass
class LagAlert:
    """Fires when the oldest waiting message is older than ``above`` seconds, continuously for
    ``for_seconds`` (as Prometheus' ``for:``); clears as soon as it is not."""

    above: float
    for_seconds: float
    since: float | None = field(default=None, repr=False)

    def check(self, sample: Sample) -> bool:
        if sample.oldest_age is not None and sample.oldest_age > self.above:
            self.since = self.since if self.since is not None else sample.t
            return sample.t - self.since >= self.for_seconds
        self.since = None
        return False


def alert_timeline(series: list[Sample], rule: LagAlert) -> list[bool]:
    rule.since = None
    return [rule.check(s) for s in series]


# --- the production tools --------------------------------------------------------------------
def _http_json(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def _wait_http(url: str, group: ProcessGroup, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if group.poll() is not None or time.monotonic() > deadline:
            tail = group.log_tail(15)
            group.kill()
            raise CourseError(f"{what} did not start (no answer at {url}).\n"
                              f"Its log ends with:\n{tail}")
        time.sleep(0.05)


class Flower:
    """Flower (Celery's web monitor) for one task module, on a loopback port, API enabled."""

    def __init__(self, stack, app: str, port: int = 0) -> None:
        self.stack, self.app, self.port = stack, app, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.group: ProcessGroup | None = None

    def start(self) -> Flower:
        env = {**os.environ, **self.stack.env,
               # Flower 2 serves its HTTP API only with auth, or when told it may: loopback only
               "FLOWER_UNAUTHENTICATED_API": "true",
               "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(),
                                                           os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "celery", "-A", self.app, "flower",
               "--address=127.0.0.1", f"--port={self.port}"]
        self.group = ProcessGroup.spawn(cmd, log=Path(self.stack.rundir) / "flower.log", env=env,
                                        watchdog=self.stack.watchdog)
        self.stack.services.append(self.group)
        _wait_http(f"{self.url}/healthcheck", self.group, "Flower")
        return self

    def api(self, path: str):
        return _http_json(f"{self.url}/api/{path.lstrip('/')}", timeout=5)

    def stop(self) -> None:
        if self.group:
            self.group.stop(timeout=5)


def promtool_check(rules: Path = RULES_FILE) -> str | None:
    """``promtool check rules``'s verdict, or None when promtool is not installed."""
    promtool = shutil.which("promtool")
    if not promtool:
        return None
    done = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True,
                          text=True, timeout=30)
    if done.returncode:
        raise CourseError(f"promtool rejects {rules}:\n{done.stdout}{done.stderr}")
    return done.stdout.strip()


class Exporter:
    """The sampler's figures as Prometheus metrics, computed at each scrape (loopback only).

    Right for a team on Celery's defaults, not only for the course's settings: the ages of
    messages a worker holds (a frozen worker holds up to concurrency, the CPU count by default, x
    the prefetch multiplier, 4, plus every ETA or countdown message it took, and its queue looks
    empty), and messages without the publish stamp (a producer that
    does not load the stamping signal) counted, and aged from the first scrape that saw them: a
    lower bound that still grows. When Redis does not answer, the scrape fails, so Prometheus's
    own ``up`` series goes to 0 and the rules' exporter-down alert can fire."""

    def __init__(self, r, queues, port: int = 0) -> None:
        from prometheus_client import CollectorRegistry, Histogram

        self.r, self.queues, self.port = r, list(queues), port or free_port()
        self.registry = CollectorRegistry()
        self.counter = DoneCounter(r)
        self.runtime = Histogram("celerylab_task_runtime_seconds", "Task runtime (started to "
                                 "finished)", ["queue"], registry=self.registry,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.registry.register(self)
        self.server = self.thread = None
        self.first_seen: dict[str, float] = {}  # unstamped messages: delivery tag -> first scrape

    def _waiting(self, ends: dict, now: float) -> tuple[float, int]:
        """(oldest waiting age, unstamped messages) of one queue's list ends."""
        unstamped = [tag for tag, stamp in ends.items() if stamp is None]
        for tag in unstamped:
            self.first_seen.setdefault(tag, now)
        since = [s for s in ends.values() if s is not None] + [self.first_seen[t] for t in unstamped]
        return (now - min(since) if since else 0.0), len(unstamped)

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        seen = len(self.counter.runtimes)
        self.counter.update()
        for queue, seconds in self.counter.runtimes[seen:]:
            self.runtime.labels(queue).observe(seconds)
        now = time.time()
        flying, held = in_flight(self.r), held_ages(self.r, now)
        ends = {q: _ends(self.r, q) for q in self.queues}
        waiting = {q: self._waiting(ends[q], now) for q in self.queues}
        self.first_seen = {t: at for t, at in self.first_seen.items()  # gone: forgotten
                           if any(t in e for e in ends.values())}
        gauges = {
            "celerylab_queue_depth": ("Messages waiting (all priority sub-lists)",
                                      lambda q: depth(self.r, q)),
            "celerylab_queue_oldest_age_seconds": ("Age of the oldest waiting message (unstamped: "
                                                   "since first scraped)", lambda q: waiting[q][0]),
            "celerylab_queue_unstamped_messages": ("Waiting messages read without a publish stamp",
                                                   lambda q: waiting[q][1]),
            "celerylab_queue_in_flight": ("Taken by a worker, not yet acknowledged",
                                          lambda q: flying.get(q, 0)),
            "celerylab_queue_held_oldest_age_seconds": ("Age of the oldest message a worker holds "
                                                        "unacknowledged (from its delivery or ETA)",
                                                        lambda q: held.get(q, 0.0)),
        }
        for name, (doc, read) in gauges.items():
            family = GaugeMetricFamily(name, doc, labels=["queue"])
            for q in self.queues:
                family.add_metric([q], read(q))
            yield family

    def describe(self):
        return []  # metrics are produced at scrape time

    def start(self) -> Exporter:
        from prometheus_client import start_http_server
        self.server, self.thread = start_http_server(self.port, addr="127.0.0.1",
                                                     registry=self.registry)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class Prometheus:
    """A real Prometheus scraping an exporter every second and evaluating the course's rules."""

    def __init__(self, stack, target: str, rules: Path = RULES_FILE) -> None:
        self.stack, self.target, self.rules = stack, target, rules
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.group: ProcessGroup | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("prometheus") is not None

    def start(self) -> Prometheus:
        home = Path(self.stack.rundir) / "prometheus"
        home.mkdir(parents=True, exist_ok=True)
        config = home / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{self.rules}']\n"
            "scrape_configs:\n"
            "  - job_name: celerylab\n"
            f"    static_configs: [{{targets: ['{self.target}']}}]\n")
        cmd = [shutil.which("prometheus"), f"--config.file={config}",
               f"--web.listen-address=127.0.0.1:{self.port}",
               f"--storage.tsdb.path={home / 'data'}"]
        self.group = ProcessGroup.spawn(cmd, log=home / "prometheus.log",
                                        watchdog=self.stack.watchdog)
        self.stack.services.append(self.group)
        _wait_http(f"{self.url}/-/ready", self.group, "Prometheus")
        deadline = time.monotonic() + 20  # ready: the exporter scraped once (its `up` is 1)
        while not any(v["value"][1] == "1" for v in self.query('up{job="celerylab"}')["result"]):
            if time.monotonic() > deadline:
                raise CourseError(f"Prometheus has not scraped {self.target} in 20 s: see "
                                  f"{Path(self.stack.rundir) / 'prometheus' / 'prometheus.log'}")
            time.sleep(0.1)
        return self

    def query(self, expr: str, at: float | None = None):
        params = {"query": expr, **({"time": f"{at:.3f}"} if at else {})}
        return _http_json(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}")["data"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0):
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": step}
        return _http_json(f"{self.url}/api/v1/query_range?{urllib.parse.urlencode(params)}")[
            "data"]["result"]

    def alerts(self) -> list[dict]:
        return _http_json(f"{self.url}/api/v1/alerts")["data"]["alerts"]

    def stop(self) -> None:
        if self.group:
            self.group.stop(timeout=5)


# --- driving load, and watching it live -----------------------------------------------------------
def run_load(rates: dict, seconds: float, actions=(), every=None, tick: float = 0.05,
             on_tick=None) -> dict:
    """Publish steadily from this thread: ``rates`` maps a queue to ``(send, per_second)`` where
    ``send(queue)`` publishes one message. ``actions`` are ``(at_seconds, callable)`` run once
    when due (a burst, a freeze, a worker added). ``every(elapsed)`` is called about once a
    second (a dashboard), ``on_tick()`` after each round of publishing (a reading). Returns
    {"t0", "sent": {queue: n}, "done_at": {action index: time}}."""
    t0 = time.time()
    sent = dict.fromkeys(rates, 0)
    pending = sorted(enumerate(actions), key=lambda x: x[1][0])
    done_at: dict[int, float] = {}
    last_call = 0.0
    while True:
        elapsed = time.time() - t0
        for queue, (send, per_second) in rates.items():
            due = int(min(elapsed, seconds) * per_second) + 1
            while sent[queue] < due:
                send(queue)
                sent[queue] += 1
        while pending and pending[0][1][0] <= elapsed:
            index, (_, action) = pending.pop(0)
            done_at[index] = time.time()
            action()
        if on_tick:
            on_tick()
        if every and elapsed - last_call >= 1.0:
            last_call = elapsed
            every(elapsed)
        if elapsed >= seconds and not pending:
            return {"t0": t0, "sent": sent, "done_at": done_at}
        time.sleep(tick)


class Dashboard:
    """A live view of a Sampler: a progress bar and, per queue, depth and oldest age so far."""

    def __init__(self, sampler: Sampler, seconds: float, threshold: float | None = None) -> None:
        import ipywidgets as w
        self.sampler, self.seconds, self.threshold = sampler, seconds, threshold
        self.progress = w.FloatProgress(min=0, max=seconds, description="load", bar_style="info")
        self.label = w.Label("")
        self.out = w.Output()
        self.drawn: dict[str, int] = {}
        self.widget = w.VBox([w.HBox([self.progress, self.label]), self.out])

    def refresh(self, elapsed: float | None = None) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import display
        samples = list(self.sampler.samples)
        if elapsed is not None:
            self.progress.value = min(elapsed, self.seconds)
            self.label.value = f"{elapsed:4.1f} s of {self.seconds:g} s, {len(samples)} samples"
        fig = plot_lag(samples, self.sampler.queues, self.sampler.t0, self.threshold)
        # what was drawn: points of the age line per queue (the tests read it)
        self.drawn = {ax.get_label(): len(ax.lines[0].get_xdata())
                      for ax in fig.axes if ax.lines}
        with self.out:
            self.out.clear_output(wait=True)
            display(fig)
        plt.close(fig)

    def done(self) -> None:
        self.progress.value = self.seconds
        self.progress.bar_style = "success"
        self.refresh()


def plot_lag(samples, queues, t0: float, threshold: float | None = None, alerts=None):
    """Per queue: depth (bars, left axis) and oldest age (line, right axis) over time; where the
    alert fired, shaded red."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(queues), figsize=(4 * len(queues), 2.8), sharey=False)
    axes = [axes] if len(queues) == 1 else list(axes)
    for ax, queue in zip(axes, queues, strict=True):
        series = [s for s in samples if s.queue == queue]
        ts = [s.t - t0 for s in series]
        ax.fill_between(ts, [s.depth for s in series], step="post", color="tab:blue", alpha=0.3,
                        label="depth")
        ax.set_ylabel("depth (messages)", color="tab:blue")
        ax.set_xlabel("seconds")
        ax.set_title(queue)
        age = ax.twinx()
        age.set_label(queue)
        age.plot(ts, [s.oldest_age or 0 for s in series], color="tab:red", label="oldest age")
        age.set_ylabel("oldest age (s)", color="tab:red")
        if threshold is not None:
            age.axhline(threshold, color="tab:red", linestyle=":", linewidth=1)
        if alerts and queue in alerts:
            for t, firing in zip(ts, alerts[queue], strict=True):
                if firing:
                    ax.axvspan(t, t + 0.25, color="red", alpha=0.12, linewidth=0)
        age.set_ylim(bottom=0)
        ax.set_ylim(bottom=0)
    from celerylab.plots import tidy
    tidy(fig)
    return fig


def pinger(url: str, hostnames, timeout: float = 0.3):
    """A function counting the workers (of ``hostnames``, a list you may extend later) that answer
    a remote-control ping within ``timeout``; its own Celery app, safe in a sampler's thread."""
    from celery import Celery
    app = Celery("celerylab-pinger", broker=url, set_as_current=False)
    app.conf.update(accept_content=["json"], broker_connection_timeout=3)

    def ping() -> int:
        replies = app.control.ping(destination=list(hostnames), timeout=timeout)
        return sum(1 for reply in replies for host in reply if host in hostnames)
    return ping


# --- the tests behind the guidelines ----------------------------------------------------------------
def results_file() -> Path:
    """Where ``./course test`` records the whole suite's last run (JUnit XML)."""
    from celerylab.processes import home
    return home() / "test-results" / "last-run.xml"


def test_results(junit: Path | None = None) -> tuple[dict[str, str], str | None]:
    """Each test's outcome in a recorded run (node id -> passed / failed / skipped), and when the
    run was; ({}, None) when no run is recorded."""
    import xml.etree.ElementTree as ET
    junit = junit or results_file()
    if not junit.exists():
        return {}, None
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    outcomes = {}
    for case in root.iter("testcase"):
        node = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
        kinds = {child.tag for child in case}
        outcomes[node] = ("failed" if kinds & {"failure", "error"} else
                          "skipped" if "skipped" in kinds else "passed")
    when = suite.get("timestamp") if suite is not None else None
    return outcomes, when


def run_tests(*paths: str, timeout: float = 60) -> dict[str, str]:
    """Run these of the course's tests now, in a pytest of their own; their outcomes."""
    from celerylab.processes import home
    root = Path(__file__).resolve().parents[1]
    if not (root / "tests").is_dir():
        raise CourseError("The course's tests/ folder is not here (an installed package): run "
                          "them from a checkout of the course.")
    junit = home() / "test-results" / f"run-{os.getpid()}.xml"
    junit.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "-p", "no:randomly", f"--junitxml={junit}", *paths], cwd=root,
                   capture_output=True, text=True, timeout=timeout)
    outcomes, _ = test_results(junit)
    junit.unlink(missing_ok=True)
    return outcomes

