"""A learner's work is never lost: copies in workspace/, untouched by a build or a pull."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, course_env

from celerylab.workspace import reset, sync

LAB = "labs/lab01_pending_messages.ipynb"


def edit(path: Path, text: str) -> None:
    nb = json.loads(path.read_text())
    nb["cells"][0]["source"] = text
    path.write_text(json.dumps(nb))


def test_sync_copies_once_and_never_overwrites(tmp_path):
    ws = tmp_path / "ws"
    first = sync(ROOT, ws)
    assert {c.state for c in first} == {"copied"} and (ws / LAB).exists()
    edit(ws / LAB, "my answer")
    again = {c.name: c for c in sync(ROOT, ws)}
    assert again[LAB].state == "edited" and not again[LAB].newer
    assert "my answer" in (ws / LAB).read_text()
    assert {c.state for n, c in again.items() if n != LAB} == {"fresh"}


def test_reset_backs_up_first(tmp_path):
    ws = tmp_path / "ws"
    sync(ROOT, ws)
    edit(ws / LAB, "my answer")
    done, backup = reset(["lab01"], ROOT, ws)
    assert done == [LAB] and backup.parent == ws / "backups"  # JupyterLab's browser shows it
    assert "my answer" in (backup / LAB).read_text()
    assert (ws / LAB).read_bytes() == (ROOT / LAB).read_bytes()


def run(cwd: Path, *args: str) -> str:
    env = course_env()
    return subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout


def test_a_build_and_a_pull_leave_a_learners_edits_intact(tmp_path):
    """Upstream changes a lab and rebuilds; the learner, who edited the lab, pulls and builds."""
    upstream, learner = tmp_path / "upstream", tmp_path / "learner"
    run(tmp_path, "git", "clone", "-q", str(ROOT), str(upstream))
    run(tmp_path, "git", "clone", "-q", str(upstream), str(learner))
    py = sys.executable
    run(learner, py, "-c", "from celerylab.workspace import sync; sync()")
    mine = learner / "workspace" / LAB
    edit(mine, "my answer")
    run(learner, py, "-m", "celerylab", "build")  # a learner's build: workspace untouched
    assert "my answer" in mine.read_text()

    source = upstream / "sources" / "lab01_pending_messages.py"
    source.write_text(source.read_text().replace("# # Lab 1", "# # Lab 1 (revised)", 1))
    run(upstream, py, "-m", "celerylab", "build")
    run(upstream, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "revise")
    run(learner, "git", "pull", "-q")
    assert "(revised)" in (learner / LAB).read_text(), "the pull updated the course's lab"
    assert "my answer" in mine.read_text(), "and left the learner's copy alone"

    doctor = run(learner, py, "-m", "celerylab", "doctor")
    assert "edited by you: lab01_pending_messages" in doctor
    assert "newer course version of: lab01_pending_messages" in doctor
    out = run(learner, py, "-m", "celerylab", "reset", "lab01")
    backup = Path(out.split("backed up to ")[1].split("/ (")[0])
    assert "my answer" in (learner / backup / LAB).read_text()
    assert "(revised)" in mine.read_text()


KERNEL = """
import sys, celerylab
stack = celerylab.start("ch06")
print(stack.server.pid, flush=True)
sys.stdin.readline()
"""


def test_reset_touches_nothing_a_live_notebook_runs(tmp_path):
    """A notebook (a kernel with its Redis) runs while the learner resets another notebook, then
    resets the course: only the process whose kernel is gone is stopped, doctor tells them apart,
    and the backup can be listed and restored."""
    import os
    import signal
    import time

    from celerylab.processes import pid_alive
    env = course_env(CELERYLAB_HOME=str(tmp_path / "home"),
                     CELERYLAB_WORKSPACE=str(tmp_path / "ws"))
    kernel = subprocess.Popen([sys.executable, "-c", KERNEL], env=env, cwd=tmp_path, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    orphan = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        redis_pid = int(kernel.stdout.readline())
        # a leftover: started by a kernel that is gone (pid 2**22 + 1 is never a live process)
        note = tmp_path / "home" / "pids" / str(orphan.pid)
        note.write_text(f"{2**22 + 1} sleep\nlab02 {time.time():.0f}\n")

        def course(*args):
            return subprocess.run([sys.executable, "-m", "celerylab", *args], env=env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=60)

        sync(ROOT, tmp_path / "ws")
        edit(tmp_path / "ws" / LAB, "my answer")
        out = course("reset", "lab01").stdout
        assert pid_alive(redis_pid) and pid_alive(orphan.pid), "reset NAME touched a process"
        assert "backed up to" in out and "./course restore NAME --from" in out

        doctor = course("doctor").stdout
        assert f"live     ch06 (kernel pid {kernel.pid}" in doctor, doctor
        assert f"{orphan.pid} sleep (of lab02)" in doctor and str(redis_pid) not in \
            doctor.split("left     ")[1], doctor

        out = course("reset").stdout
        assert "stopped 1 leftover" in out and "ch06 (kernel pid" in out, out
        orphan.wait(10)
        assert pid_alive(redis_pid), "reset stopped a live notebook's Redis"
        assert list((tmp_path / "home" / "run").glob(f"ch06-{kernel.pid}")), \
            "reset deleted a live notebook's runtime files"

        listed = course("backups").stdout
        assert "lab01_pending_messages" in listed, listed
        out = course("restore", "lab01")
        assert out.returncode == 0, out.stderr
        assert "my answer" in (tmp_path / "ws" / LAB).read_text()
        assert "edited by you: lab01_pending_messages" in course("doctor").stdout
    finally:
        orphan.kill()
        kernel.stdin.close()
        kernel.wait(20)
        if kernel.returncode is None:
            os.kill(kernel.pid, signal.SIGKILL)
