"""Real worker processes: boot, readiness, failure messages, crashes and cleanup."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from celerylab.processes import pid_alive
from celerylab.workers import WorkerError


def wait_gone(pids, timeout=10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


def test_worker_boots_runs_tasks_and_records_them(stack, tasks_module):
    worker = stack.spawn_worker(tasks_module, concurrency=2)
    assert worker.boot_seconds < 10
    assert len(worker.children()) == 2
    mod = __import__(tasks_module)
    results = [mod.add.delay(i, i) for i in range(6)]
    assert [r.get(timeout=10) for r in results] == [0, 2, 4, 6, 8, 10]
    attempts = stack.wait_for([r.id for r in results])
    assert {a.state for a in attempts} == {"SUCCESS"}
    assert {a.pid for a in attempts} <= set(worker.children())
    assert all(a.sent <= a.received <= a.started <= a.finished for a in attempts)
    assert "--without-mingle" in worker.command and "--concurrency" in worker.command


def test_worker_with_missing_module_fails_fast_with_its_log(stack, tasks_module):
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as err:
        stack.spawn_worker("no_such_tasks_module")
    assert time.monotonic() - t0 < 10
    assert "no_such_tasks_module" in str(err.value)
    assert re.search(r"exited with code [1-9]", str(err.value)), "its exit status is reported"


def test_worker_whose_module_raises_shows_the_error(stack, tmp_path, monkeypatch):
    (tmp_path / "broken_tasks.py").write_text("raise RuntimeError('typo in the task module')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WorkerError, match="typo in the task module"):
        stack.spawn_worker("broken_tasks")


def test_stop_leaves_no_process(stack, tasks_module):
    worker = stack.spawn_worker(tasks_module, concurrency=2)
    pids = [worker.pid, *worker.children()]
    worker.stop()
    assert wait_gone(pids) == []


def test_killed_child_is_replaced_and_its_task_fails(stack, tasks_module):
    worker = stack.spawn_worker(tasks_module, concurrency=1)
    mod = __import__(tasks_module)
    res = mod.nap.delay(5)
    attempt = stack.started(res.id)
    assert worker.kill_child() == attempt.pid
    with pytest.raises(Exception, match="signal 9"):
        res.get(timeout=15)
    new = stack.wait_until(lambda: [p for p in worker.children() if p != attempt.pid], 10)
    assert new and attempt.pid not in new


def test_killing_the_whole_worker_takes_its_children(stack, tasks_module):
    worker = stack.spawn_worker(tasks_module, concurrency=2)
    pids = [worker.pid, *worker.children()]
    worker.kill()
    assert wait_gone(pids, 5) == []


KERNEL = """
import json, sys, time
import celerylab
from celerylab.processes import Launcher
stack = celerylab.start("orphans")
w = stack.spawn_worker(sys.argv[1], concurrency=2)
print(json.dumps([stack.server.pid, Launcher.get().group.pid, w.pid, *w.children()]), flush=True)
time.sleep(120)
"""


def test_a_killed_kernel_leaves_nothing_running(tasks_module, tmp_path):
    """SIGKILL the 'kernel' (no atexit, no finally): the watchdog stops Redis and the worker."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.path.dirname(os.path.dirname(__file__))])
    kernel = subprocess.Popen([sys.executable, "-c", KERNEL, tasks_module], stdout=subprocess.PIPE,
                              text=True, env=env, cwd=tmp_path)
    try:
        pids = json.loads(kernel.stdout.readline())
        assert len(pids) == 5 and all(pid_alive(p) for p in pids)
        kernel.send_signal(signal.SIGKILL)
        kernel.wait(5)
        assert wait_gone(pids, 10) == [], "orphans left after the kernel died"
    finally:
        kernel.kill()


def test_a_real_jupyter_kernel_killed_mid_notebook_leaves_nothing(tasks_module, tmp_path):
    """The same, through jupyter_client: a real IPython kernel, SIGKILLed mid-notebook."""
    from jupyter_client.manager import start_new_kernel

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.path.dirname(os.path.dirname(__file__))])}
    env.pop("REDIS_URL", None)
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path), env=env)
    out: list[str] = []
    try:
        code = ("import json, os, celerylab\nstack = celerylab.start('killed')\n"
                f"w = stack.spawn_worker({tasks_module!r}, concurrency=2)\n"
                "from celerylab.processes import Launcher\n"
                "print(json.dumps([os.getpid(), stack.server.pid, Launcher.get().group.pid,"
                " w.pid, *w.children()]))")
        reply = kc.execute_interactive(
            code, timeout=60,
            output_hook=lambda m: out.append(m["content"].get("text", "")))
        assert reply["content"]["status"] == "ok"
        kernel, *pids = json.loads("".join(out))
        assert len(pids) == 5 and all(pid_alive(p) for p in pids)
        os.kill(kernel, signal.SIGKILL)
        assert wait_gone(pids, 10) == [], "orphans left after the kernel was killed"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_a_busy_loop_ends_with_the_process_that_started_it():
    """The load tests' busy loop (the hog fixture, bench --soak --hog) never outlives its parent,
    even when the parent is killed before it can clean up."""
    code = ("from celerylab.reference import busy_loop; import os, signal; "
            "print(busy_loop().pid, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    hog = int(out.split()[0])
    assert wait_gone([hog], timeout=5) == [], "the busy loop outlived its parent"


def test_an_interrupt_while_workers_boot_leaves_none_running(stack, tasks_module, monkeypatch):
    """Ctrl-C (a kernel interrupt) during start_workers: every worker that booted is stopped."""
    import os
    import signal

    import pytest

    from celerylab import workers as workers_module
    spawn = workers_module.ProcessGroup.spawn
    spawned = []

    import threading
    lock = threading.Lock()

    def spawn_then_interrupt(*args, **kwargs):  # Ctrl-C right after a worker process is spawned:
        group = spawn(*args, **kwargs)          # by construction while the workers boot
        with lock:
            spawned.append(group)
            if len(spawned) == 2:  # once
                os.kill(os.getpid(), signal.SIGINT)  # handled in the main thread, in its join()
        return group

    monkeypatch.setattr(workers_module.ProcessGroup, "spawn", spawn_then_interrupt)
    workers = [stack.worker(tasks_module, name=f"i{i}") for i in range(2)]
    # Ctrl-C as a kernel sees it (whatever an earlier test of this pytest process left installed)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            stack.start_workers(*workers)
    finally:
        signal.signal(signal.SIGINT, before)
    assert len(spawned) == 2 and not any(w.alive for w in workers)


EDITED = '''
import os

from celery import Celery

app = Celery("edited", broker=os.environ["CELERYLAB_BROKER_URL"],
             backend=os.environ["CELERYLAB_BROKER_URL"])
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])


@app.task(name="edited.version")
def version():
    return {"code": VERSION, "cwd": os.getcwd(), "ns": os.environ["CELERYLAB_NAMESPACE"]}


VERSION = "@VERSION@"
'''


@pytest.mark.parametrize("launch", ["fork", "exec"])
def test_each_worker_is_its_own_process_and_runs_the_module_as_it_is_now(
        stack, tmp_path, monkeypatch, launch):
    """Workers fork from the kernel's launcher, which imported celery once (or, with
    CELERYLAB_WORKER_LAUNCH=exec, start as a fresh python). Either way each is its own process
    and session, in its own folder and environment, and imports the task module as it is when it
    boots: a learner's edit shows in the next worker, never the launcher's stale copy."""
    from celerylab.processes import Launcher
    monkeypatch.setenv("CELERYLAB_WORKER_LAUNCH", launch)
    folder = tmp_path / "lesson"
    folder.mkdir()
    answers = []
    for version in ("v1", "v2"):
        (folder / "edited.py").write_text(EDITED.replace("@VERSION@", version))
        worker = stack.spawn_worker("edited", name=f"e{version}", cwd=folder)
        assert os.getsid(worker.pid) == worker.pid, "a worker leads its own session"
        parent = int(Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        expected = Launcher.get().group.pid if launch == "fork" else os.getpid()
        assert parent == expected, f"{launch}: the worker's parent is {parent}"
        cmdline, name = Path(f"/proc/{worker.pid}/cmdline"), f"[celeryd: {worker.hostname}:"
        title = stack.wait_until(lambda c=cmdline, n=name: n in (t := c.read_text()) and t, 5,
                                 "its title")
        assert "-A edited worker" in title, f"ps shows it by name and command: {title}"
        answers.append(stack.control.send_task("edited.version").get(timeout=15))
        worker.stop()
        assert worker.group.poll() is not None, "its exit status is known once it stopped"
    assert [a["code"] for a in answers] == ["v1", "v2"]
    assert {a["cwd"] for a in answers} == {str(folder)}
    assert {a["ns"] for a in answers} == {stack.namespace}


def test_a_worker_with_an_environment_of_its_own_starts_afresh(stack, tasks_module):
    """Modules read some variables at import (billiard's REMAP_SIGTERM, TZ, ...): a worker given
    a variable the launcher's imports did not see starts as a fresh python; the course's own
    variables do not matter to those imports, so such a worker still forks."""
    from celerylab.processes import Launcher
    launcher = Launcher.get().group.pid

    def parent(worker):
        return int(Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    forked = stack.spawn_worker(tasks_module, name="same", env={"CELERYLAB_EXTRA": "1"})
    fresh = stack.spawn_worker(tasks_module, name="own", env={"REMAP_SIGTERM": "SIGQUIT"})
    assert parent(forked) == launcher and parent(fresh) == os.getpid()


OUTAGE_KERNEL = """
import json, os, signal, time
import celerylab
from celerylab import outage
stack = celerylab.start("outage")
spare = outage.spare_broker(stack)
os.kill(spare.pid, signal.SIGSTOP)  # killed while frozen, as a check interrupted mid-freeze
found = outage.sentinels(stack)
pids = [stack.server.pid, spare.pid] + [s.pid for s in found.servers()] + [
    g.pid for _, g in found.sentinels]
print(json.dumps(pids), flush=True)
if os.environ.get("STOP_IT"):
    stack.stop()
    print(json.dumps(pids), flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("how", ["stack.stop()", "kernel SIGKILLed"])
def test_chapter_9_brokers_and_sentinels_never_outlive_their_notebook(tmp_path, how):
    """The spare broker (even frozen), the Sentinel set's primary, replica and three sentinels:
    stopped with the stack, and by the watchdog when the kernel is killed."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(__file__))
    if how == "stack.stop()":
        env["STOP_IT"] = "1"
    kernel = subprocess.Popen([sys.executable, "-c", OUTAGE_KERNEL], stdout=subprocess.PIPE,
                              text=True, env=env, cwd=tmp_path)
    try:
        pids = json.loads(kernel.stdout.readline())
        assert len(pids) == 7
        if how == "stack.stop()":
            kernel.stdout.readline()  # stopped
        else:
            kernel.send_signal(signal.SIGKILL)
            kernel.wait(5)
        assert wait_gone(pids, 10) == [], f"left running after {how}"
    finally:
        kernel.kill()
