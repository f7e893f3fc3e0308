"""docker-compose.yml exercised, not only parsed: every service that runs a command is started
natively from its own `command` and `environment` (service host names mapped to 127.0.0.1, Redis
on a free port, the worker scaled to 2, Flower), a task sent from the lab service's environment is
run by a worker service and shows in Flower's API; then everything is stopped.

No container engine runs here: this checks what the compose file says each service does. The
image-only services (RabbitMQ) have no command of their own to run."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from conftest import ROOT, course_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def native(value: str, ports: dict[str, int]) -> str:
    """A compose value as it means natively: ${VAR:-default} interpolated, service names ->
    127.0.0.1, published ports mapped."""
    value = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m.group(1)) or m.group(2),
                   value)
    value = value.replace("redis://redis:6379", f"redis://127.0.0.1:{ports['redis']}")
    value = value.replace("0.0.0.0", "127.0.0.1")  # loopback only, always
    value = value.replace("--port=5555", f"--port={ports['flower']}")
    return value


def environment(service: dict, ports: dict[str, int], **extra) -> dict[str, str]:
    env = course_env(**{k: native(str(v), ports) for k, v in (service.get("environment") or
                                                              {}).items()})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def command(service: dict, ports: dict[str, int]) -> list[str]:
    cmd = [native(str(part), ports) for part in service["command"]]
    if cmd[0] in ("python", "celery"):  # the image's python and celery are the venv's here
        cmd = [sys.executable] + (["-m", "celery"] if cmd[0] == "celery" else []) + cmd[1:]
    return cmd


def http_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read().decode())


def test_every_compose_service_runs_natively_and_they_work_together(tmp_path):
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = spec["services"]
    runnable = {name for name, s in services.items() if s.get("command")}
    assert runnable == {"redis", "lab", "worker", "flower"}, runnable
    ports = {"redis": free_port(), "flower": free_port(), "lab": free_port()}
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str], env: dict, log: str) -> subprocess.Popen:
        out = open(tmp_path / log, "w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs.append(proc)
        return proc

    def log(name: str) -> str:
        return (tmp_path / name).read_text()[-3000:]

    def wait(what: str, test, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = test()
                if value:
                    return value
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{what} did not happen within {timeout:.0f} s")

    try:
        # redis: its own command, on a free loopback port
        redis_cmd = [*services["redis"]["command"], "--port", str(ports["redis"]),
                     "--bind", "127.0.0.1", "--dir", str(tmp_path)]
        start("redis", redis_cmd, course_env(), "redis.log")
        import redis as redis_py
        client = redis_py.Redis(port=ports["redis"], socket_connect_timeout=0.5)
        wait("redis answering", client.ping)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"

        # worker, scaled to 2 (each container would have its own hostname: %h)
        for i in (1, 2):
            cmd = [part.replace("%h", f"worker-{i}") for part in
                   command(services["worker"], ports)]
            start(f"worker-{i}", cmd, environment(services["worker"], ports), f"worker-{i}.log")
        # flower
        start("flower", command(services["flower"], ports),
              environment(services["flower"], ports), "flower.log")
        wait("Flower answering", lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{ports['flower']}/healthcheck", timeout=2).status == 200)
        # lab: the open command, until JupyterLab answers with its token
        lab_env = environment(services["lab"], ports, CELERYLAB_JUPYTER_PORT=str(ports["lab"]),
                              CELERYLAB_NO_BROWSER="1")
        assert lab_env["CELERYLAB_JUPYTER_IP"] == "127.0.0.1"
        start("lab", command(services["lab"], ports), lab_env, "lab.log")
        url = wait("the lab service's ready URL", lambda: re.search(
            r"The course is open:\s+(http://127\.0\.0\.1:\d+/lab/tree/\S+\?token=\w+)",
            log("lab.log")),
            timeout=90).group(1)
        assert f":{ports['lab']}/" in url

        # both workers up, as Flower sees them
        def two_workers():
            workers = http_json(f"http://127.0.0.1:{ports['flower']}/api/workers?refresh=1")
            return workers if len(workers) == 2 else None
        names = wait("both workers in Flower", two_workers)
        assert set(names) == {"default@worker-1", "default@worker-2"}, names

        # a task sent from the lab service's environment, run by a worker service
        sent = subprocess.run(
            [sys.executable, "-c", "from celerylab.demo_tasks import add; r = add.delay(2, 3); "
             "print(r.id, r.get(timeout=15))"], cwd=ROOT, env=lab_env, capture_output=True,
            text=True, timeout=60)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        task_id, value = sent.stdout.split()
        assert value == "5"
        task = wait("the task in Flower", lambda: http_json(
            f"http://127.0.0.1:{ports['flower']}/api/task/info/{task_id}"))
        assert task["state"] == "SUCCESS" and task["worker"] in names, task
        assert client.llen("celery") == 0, "database 0's queue, served by the worker service"
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
    assert all(p.poll() is not None for p in procs)
    for port in ports.values():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still listening"
