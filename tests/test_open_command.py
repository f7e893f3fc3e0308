"""The open-the-course command, run for real until JupyterLab answers with its token."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from conftest import course_env

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_course_open_serves_jupyterlab_with_a_token():
    port = free_port()
    env = course_env(CELERYLAB_JUPYTER_PORT=str(port), CELERYLAB_NO_BROWSER="1")
    if "CELERYLAB_VENV" in os.environ:
        env["CELERYLAB_VENV"] = os.environ["CELERYLAB_VENV"]
    proc = subprocess.Popen([str(ROOT / "course"), "open"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen, url = [], None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and url is None:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            m = re.search(r"The course is open:\s+(http://127\.0\.0\.1:(\d+)/lab\?token=(\w+))", line)
            if m:
                url = m.group(1)
        assert url, "no ready URL printed:\n" + "".join(seen[-30:])
        assert int(re.search(r":(\d+)/", url).group(1)) == port
        token = url.rsplit("=", 1)[1]
        assert len(token) >= 32
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}",
                                    timeout=5) as resp:
            assert resp.status == 200
        try:  # the token is on: no access without it
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents", timeout=5)
            raise AssertionError("JupyterLab answered without a token")
        except urllib.error.HTTPError as err:
            assert err.code == 403
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    assert proc.returncode == 0, "".join(seen[-20:])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "JupyterLab still listening after stop"
