"""The open-the-course command, run for real until JupyterLab answers with its token."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import open_course, stop_course

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stop", ["ctrl-c", "kill -INT"], ids=["Ctrl-C to the process group",
                                                               "SIGINT to the command alone"])
def test_course_open_serves_jupyterlab_with_a_token(stop):
    """As a learner runs it, until JupyterLab answers with its token; then stopped the way a
    terminal does (Ctrl-C: SIGINT to the whole group) or a script does (SIGINT to the command
    alone, no terminal): both stop JupyterLab."""
    port = free_port()
    proc, base, token, got_port, seen = open_course(CELERYLAB_JUPYTER_PORT=str(port))
    try:
        assert got_port == port
        assert len(token) >= 32
        with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as resp:
            assert resp.status == 200
        opened = next(line for line in seen if "The course is open" in line)
        assert "/lab/tree/notebooks/ch00_setup.ipynb?token=" in opened, opened
        with urllib.request.urlopen(f"{base}/api/contents/notebooks/ch00_setup.ipynb"
                                    f"?content=0&token={token}", timeout=5) as resp:
            assert resp.status == 200  # the root is the workspace: the learner's copy opens
        with urllib.request.urlopen(f"{base}/api/contents?content=1&token={token}",
                                    timeout=5) as resp:
            top = {item["name"] for item in json.load(resp)["content"]}
        assert {"notebooks", "labs"} <= top and not top & {"solutions", "sources", "tests"}, top
        try:  # the token is on: no access without it
            urllib.request.urlopen(f"{base}/api/contents", timeout=5)
            raise AssertionError("JupyterLab answered without a token")
        except urllib.error.HTTPError as err:
            assert err.code == 403
    finally:
        stop_course(proc, group=(stop == "ctrl-c"))
    assert proc.returncode == 0, "".join(seen[-20:])
    deadline = time.monotonic() + 5  # the last lines may still be on their way from the pipe
    while not any("Your work is saved" in line for line in seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    said = "".join(seen[-5:])
    assert "stopped JupyterLab" in said and "Your work is saved in" in said, said
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "JupyterLab still listening after stop"


def test_the_jupyter_news_prompt_is_turned_off(tmp_path):
    """The open command writes the course's JupyterLab overrides (merged with any others)."""
    import json

    from celerylab.cli import install_lab_overrides
    path = tmp_path / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"@jupyterlab/apputils-extension:themes": {"theme": "dark"}}))
    assert install_lab_overrides(str(tmp_path)) == path
    settings = json.loads(path.read_text())
    assert settings["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"
    assert settings["@jupyterlab/apputils-extension:themes"] == {"theme": "dark"}



def test_a_signal_while_jupyterlab_starts_stops_it_too():
    """SIGINT to the command alone while JupyterLab is still starting: nothing is left running."""
    import subprocess

    from conftest import ROOT, course_env
    port = free_port()
    proc = subprocess.Popen([str(ROOT / "course"), "open"], cwd=ROOT,
                            env=course_env(CELERYLAB_JUPYTER_PORT=str(port),
                                           CELERYLAB_NO_BROWSER="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:  # the course Redis check has run; JupyterLab is being started
            if "course Redis OK" in line:
                break
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    def lab_processes():  # JupyterLab started for this port, by its command line
        import subprocess as sp
        found = sp.run(["pgrep", "-f", f"ServerApp.port={port} "], capture_output=True, text=True)
        return found.stdout.split()

    deadline = time.monotonic() + 10
    while lab_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = lab_processes()
    for pid in left:
        os.kill(int(pid), signal.SIGKILL)
    assert not left, "JupyterLab left running after the open command was interrupted"
