"""The course in a real browser: JupyterLab started by the open command, driven by headless
Chromium (the system's, through playwright; nothing is downloaded). Chapter 0 and a solved lab
are run top to bottom from the menu; no cell may end in an error, widgets and images must render,
and pressing a widget's button must show its result in the notebook. A screenshot of each is
saved in .celerylab/screenshots/.

The notebooks run in a workspace of the test's own (CELERYLAB_WORKSPACE), never a learner's."""

from __future__ import annotations

import json
import re
import shutil
import socket
import time

import pytest
from conftest import ROOT, open_course, stop_course

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser",
                                                         "google-chrome")) if p), None)
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - a dev dependency
    sync_playwright = None

pytestmark = pytest.mark.skipif(
    not CHROMIUM or sync_playwright is None,
    reason="no Chromium on PATH (Debian: apt-get install chromium; .ci/run installs it when "
           "root): the real-browser test needs a browser and does not download one")
SHOTS = ROOT / ".celerylab" / "screenshots"
NB = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook in view (JupyterLab restores others)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """``./course open`` for real, on a workspace of its own (outside the course folder, so
    JupyterLab's root is that workspace)."""
    home = tmp_path_factory.mktemp("browser")
    workspace = home / "workspace"
    # every cell rendered (JupyterLab 4 otherwise renders only those in view), in a settings
    # folder of the test's own
    settings = home / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    proc, base, token, _port, _seen = open_course(
        CELERYLAB_JUPYTER_PORT=str(free_port()), CELERYLAB_WORKSPACE=str(workspace),
        JUPYTERLAB_SETTINGS_DIR=str(home / "settings"))
    try:
        shutil.copy(ROOT / "solutions" / "lab01_pending_messages.ipynb",
                    workspace / "lab01_solved.ipynb")
        yield {"base": base, "token": token, "workspace": workspace}
    finally:
        stop_course(proc)


@pytest.fixture
def page():
    """A page of the system's headless Chromium; closed afterwards."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1000})
        finally:
            browser.close()


def kernel_idle(course, path: str) -> bool:
    """The notebook's kernel is up and idle, as the server sees it (REST API)."""
    import urllib.request
    url = f"{course['base']}/api/sessions?token={course['token']}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        sessions = json.loads(resp.read().decode())
    return any(s["path"].endswith(path) and s["kernel"]["execution_state"] == "idle"
               for s in sessions)


def saved_counts(page, course, path: str) -> list:
    page.keyboard.press("Control+s")
    time.sleep(0.5)
    nb = json.loads((course["workspace"] / path).read_text())
    return [c.get("execution_count") for c in nb["cells"] if c["cell_type"] == "code"]


def run_all_and_save(page, course, path: str, timeout: float = 120, *,
                     keep_last: bool = False) -> dict:
    """Open a notebook, wait for its kernel, Run All from the menu (``keep_last``: all but the
    last cell, the one that stops the stack, so widgets still have one), wait until those code
    cells have run (read from the saved file); return the saved notebook (its outputs are what
    the browser got from the kernel)."""
    # a JupyterLab workspace (tab layout) of its own: only this notebook open
    name = re.sub(r"\W", "-", path)
    page.goto(f"{course['base']}/lab/workspaces/{name}/tree/{path}?reset&token={course['token']}")
    page.wait_for_selector(f"{NB} .jp-Cell", timeout=60_000)
    deadline = time.monotonic() + 60
    while not kernel_idle(course, path):
        assert time.monotonic() < deadline, f"{path}: its kernel did not start"
        time.sleep(0.3)
    cells = page.locator(f"{NB} .jp-CodeCell .jp-InputPrompt")
    for _attempt in range(3):  # the frontend may still be connecting to the kernel: try again
        (cells.last if keep_last else cells.first).click()  # select a cell, focus the notebook
        page.click("li.lm-MenuBar-item:has-text('Run')")
        page.click("li.lm-Menu-item:has-text('Run All Above Selected Cell')" if keep_last else
                   "li.lm-Menu-item >> text='Run All Cells'")
        def started():  # a prompt shows [*] or [n]: the frontend sent the cells to the kernel
            return any(re.search(r"\[(\*|\d+)\]", p) for p in cells.all_inner_texts())
        until = time.monotonic() + 10
        while time.monotonic() < until and not started():
            time.sleep(0.2)
        if started():
            break
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = saved_counts(page, course, path)
        if counts and all(counts[:-1] if keep_last else counts) and kernel_idle(course, path):
            break
        time.sleep(1)
    else:
        page.screenshot(path=str(SHOTS / "timeout.png"), full_page=True)
        raise AssertionError(f"{path}: not every cell ran within {timeout:.0f} s: {counts}")
    return json.loads((course["workspace"] / path).read_text())


def errors_in(nb: dict) -> list[str]:
    return [f"cell {i}: {o.get('ename')}: {o.get('evalue', '')[:200]}"
            for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
            for o in c.get("outputs", []) if o["output_type"] == "error"]


def test_chapter_0_runs_in_a_real_browser_with_widgets_and_plots(course, page):
    nb = run_all_and_save(page, course, "notebooks/ch00_setup.ipynb", keep_last=True)
    assert not errors_in(nb), errors_in(nb)
    images = page.locator(f"{NB} .jp-RenderedImage img")
    assert images.count() >= 2, "the plots rendered as images"
    assert all(images.nth(i).evaluate("img => img.naturalWidth > 0")
               for i in range(images.count()))
    button = page.locator(f"{NB} .jupyter-widgets button:has-text('handle requests')")
    button.wait_for(timeout=20_000)  # the widget rendered, not just its text repr
    output = page.locator(f"{NB} .jupyter-widgets .jp-OutputArea").last
    before = output.inner_text()
    button.scroll_into_view_if_needed()
    button.click()
    page.wait_for_function(
        "(el) => /requests, median [0-9.]+ ms/.test(el.innerText)",
        arg=output.element_handle(), timeout=20_000)
    assert output.inner_text() != before
    assert re.search(r"enqueue: 5 requests, median [\d.]+ ms", output.inner_text())
    page.screenshot(path=str(SHOTS / "ch00_setup.png"), full_page=True)
    page.locator(f"{NB} .jp-CodeCell .jp-InputPrompt").last.click()
    page.keyboard.press("Control+Enter")  # the last cell, stack.stop(); no new cell
    deadline = time.monotonic() + 30
    while not all(saved_counts(page, course, "notebooks/ch00_setup.ipynb")):
        assert time.monotonic() < deadline, "the stack.stop() cell did not run"
        time.sleep(0.5)


def test_a_solved_lab_runs_in_a_real_browser_and_passes_its_check(course, page):
    nb = run_all_and_save(page, course, "lab01_solved.ipynb")
    assert not errors_in(nb), errors_in(nb)
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] ==
                   "code" for o in c.get("outputs", []))
    assert "Lab 1 passed" in text
    assert page.locator(f"{NB} .jp-OutputArea-output:has-text('Lab 1 passed')").count() == 1
    page.screenshot(path=str(SHOTS / "lab01_solved.png"), full_page=True)


def run_cell(page, course, path: str, code: re.Pattern) -> None:
    """Run the one code cell whose text matches ``code`` (Ctrl+Enter), wait for the kernel."""
    cell = page.locator(f"{NB} .jp-CodeCell").filter(has_text=code).first
    cell.locator(".jp-InputPrompt").click()
    page.keyboard.press("Control+Enter")
    time.sleep(1)
    deadline = time.monotonic() + 60
    while not kernel_idle(course, path):
        assert time.monotonic() < deadline, f"{path}: the cell {code.pattern} did not finish"
        time.sleep(0.3)


def press(page, label: str, expect: str) -> str:
    button = page.locator(f"{NB} .jupyter-widgets button:has-text('{label}')")
    output = page.locator(f"{NB} .jupyter-widgets .jp-OutputArea").last
    button.scroll_into_view_if_needed()
    button.click()
    try:  # a bound for a busy machine, not a pace: it returns as soon as the text is there
        page.wait_for_function("([el, pat]) => new RegExp(pat).test(el.innerText)",
                               arg=[output.element_handle(), expect], timeout=60_000)
    except Exception as exc:  # playwright's TimeoutError: say what the control showed instead
        raise AssertionError(f"{label!r} did not show /{expect}/ within 60 s; it showed: "
                             f"{output.inner_text()!r}") from exc
    return output.inner_text()


def test_run_all_twice_then_the_setup_cell_alone_then_the_control(course, page):
    """A learner's day: Run All twice in one kernel, then only the setup cell again, then the
    control. The control says which cell to run (one line); after that cell it works."""
    path = "notebooks/ch00_setup.ipynb"
    for _ in range(2):
        nb = run_all_and_save(page, course, path, keep_last=True)
        assert not errors_in(nb), errors_in(nb)
    press(page, "handle requests", r"enqueue: 5 requests, median [\d.]+ ms")
    run_cell(page, course, path, re.compile(r"stack = celerylab\.start\("))
    said = press(page, "handle requests", "run the cell that imports ch00_tasks again")
    assert "Traceback" not in said and len(said.strip().splitlines()) <= 2, said
    run_cell(page, course, path, re.compile(r"import ch00_tasks"))
    press(page, "handle requests", r"enqueue: 5 requests, median [\d.]+ ms")
    page.screenshot(path=str(SHOTS / "ch00_after_resetup.png"), full_page=True)
    run_cell(page, course, path, re.compile(r"stack\.stop\(\)"))
