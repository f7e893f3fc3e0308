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
    done, backup = reset(["lab01"], ROOT, ws, backup_root=tmp_path / "backup")
    assert done == [LAB]
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
    backup = Path(out.split("your versions are in ")[1].strip())
    assert "my answer" in (backup / LAB).read_text()
    assert "(revised)" in mine.read_text()
