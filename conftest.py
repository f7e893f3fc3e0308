"""How the suite runs notebooks (nbval): each one twice in one kernel, its outputs free of warnings.

A learner presses Run All, changes a setting, and presses Run All again in the same kernel; the
second run must work as well as the first. So every chapter and solution notebook is collected as
its cells, then its cells again ("Cell N (run 2)"), all run in the one kernel nbval starts for the
file: the second run shares the first's kernel, so no notebook runs three times.

A cell whose output shows a Python warning (a pink ``UserWarning`` box in JupyterLab) or the
traceback of an exception a library swallowed ("Exception ignored in: ...") fails: a learner
should see the course's words, not a library's noise.
"""

from __future__ import annotations

import os
import re

RUNS = int(os.environ.get("CELERYLAB_NOTEBOOK_RUNS", "2"))
WARNING = re.compile(r"\b\w*Warning: .*")
# An exception a library printed and swallowed (garbage collection, a thread): a learner sees its
# traceback in the cell, e.g. celery's "Retry limit exceeded" from an AsyncResult's __del__.
IGNORED = re.compile(r"Exception ignored in: .*|Exception in thread .*")


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("nbval"):
        return
    from nbval import plugin

    class CourseCell(plugin.IPyNbCell):
        def runtest(self):
            super().runtest()
            for out in self.test_outputs or []:
                if out.get("output_type") == "stream" and out.get("name") == "stderr":
                    text = out.get("text", "")
                    found = WARNING.search(text)
                    if found:
                        self.raise_cell_error(
                            f"a warning in the cell's output (a learner sees it): {found.group(0)}")
                    found = IGNORED.search(text)
                    if found:
                        self.raise_cell_error(
                            f"a swallowed exception's traceback in the cell's output (a learner "
                            f"sees it): {found.group(0)}\n{text[-1500:]}")

    def collect(self):
        cells = list(original(self))
        for run in range(1, RUNS + 1):
            suffix = "" if run == 1 else f" (run {run})"
            for cell in cells:
                yield CourseCell.from_parent(self, name=cell.name + suffix, cell_num=cell.cell_num,
                                             cell=cell.cell, options=cell.options)

    original = plugin.IPyNbFile.collect
    if not getattr(original, "celerylab", False):
        collect.celerylab = True
        plugin.IPyNbFile.collect = collect


# The order files are handed to xdist's processes (./course test passes --dist loadfile and
# --no-loadscope-reorder): the longest first, so that no long file starts last and runs alone
# while the other processes idle (xdist's default hands out the files with the most items first:
# notebooks, whose cells are items, before the lab modules, a few items of a minute each). Serial
# seconds per file from a clean-clone run (docs/benchmarks.md, session 17); it only orders, and a
# file missing from it gets its kind's typical time.
COST = {
    "tests/test_lab02.py": 125, "tests/test_lab04.py": 111, "notebooks/ch02_worker_processes.ipynb": 109,
    "tests/test_lab07.py": 102, "notebooks/ch07_observability_and_lag.ipynb": 98,
    "notebooks/ch06_prefetch_and_throughput.ipynb": 96, "tests/test_lab09.py": 96,
    "tests/test_lab05.py": 94, "tests/test_lab08.py": 91, "notebooks/ch08_capstone.ipynb": 83,
    "notebooks/ch09_broker_failures.ipynb": 83, "tests/test_browser.py": 78,
    "solutions/lab08_capstone.ipynb": 76, "notebooks/ch04_delivery_and_idempotency.ipynb": 75,
    "solutions/lab09_broker_failures.ipynb": 65, "notebooks/ch01_brokers_and_messages.ipynb": 55,
    "tests/test_lab03.py": 54, "solutions/lab02_pool_and_concurrency.ipynb": 54,
    "notebooks/ch03_queue_routing.ipynb": 54, "notebooks/ch10_workflows.ipynb": 48,
}


def _cost(path: str) -> float:
    if path in COST:
        return COST[path]
    name = path.rsplit("/", 1)[-1]
    return 60 if name.startswith("test_lab") else 50 if path.startswith("notebooks/") else (
        30 if path.startswith("solutions/") else 10)


def pytest_collection_modifyitems(config, items):
    if not getattr(config.option, "loadscopereorder", True):
        files = {item.nodeid.split("::")[0] for item in items}
        rank = {f: n for n, f in enumerate(sorted(files, key=lambda f: (-_cost(f), f)))}
        items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])  # stable: cells stay in order


# Where the suite's time goes: each test file's total (setup + call + teardown of its items, added
# up across xdist workers), printed after pytest's own slowest items (--durations).
_spent: dict[str, float] = {}


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    _spent[path] = _spent.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if not _spent or len(_spent) < 2:
        return
    terminalreporter.section("time per test file (serial seconds, slowest first)")
    for path, seconds in sorted(_spent.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{seconds:8.1f}  {path}")
    terminalreporter.write_line(f"{sum(_spent.values()):8.1f}  in all")
