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
