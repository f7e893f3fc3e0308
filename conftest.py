"""How the suite runs notebooks (nbval): each one twice in one kernel, its outputs free of warnings.

A learner presses Run All, changes a setting, and presses Run All again in the same kernel; the
second run must work as well as the first. So every chapter and solution notebook is collected as
its cells, then its cells again ("Cell N (run 2)"), all run in the one kernel nbval starts for the
file: the second run shares the first's kernel, so no notebook runs three times.

A cell whose output shows a Python warning (a pink ``UserWarning`` box in JupyterLab) fails: a
learner should see the course's words, not a library's noise.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

RUNS = int(os.environ.get("CELERYLAB_NOTEBOOK_RUNS", "2"))
WARNING = re.compile(r"\b\w*Warning: .*")


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("nbval"):
        return
    from nbval import plugin

    class CourseCell(plugin.IPyNbCell):
        def runtest(self):
            super().runtest()
            for out in self.test_outputs or []:
                if out.get("output_type") == "stream" and out.get("name") == "stderr":
                    found = WARNING.search(out.get("text", ""))
                    if found:
                        self.raise_cell_error(
                            f"a warning in the cell's output (a learner sees it): {found.group(0)}")

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


# Longest files first. `./course test` hands whole files to its xdist workers as they free up
# (--dist loadfile --no-loadscope-reorder): starting the longest first keeps one long file from
# running alone at the end. A file's weight is its serial seconds in the last run here
# (MEASURED, written below), else in the committed table; a file in neither (a new chapter)
# counts as NEW_FILE_SECONDS. The order within a file is kept (a notebook's run 2 follows run 1).
HERE = Path(__file__).resolve().parent
COMMITTED = HERE / "tests" / "seconds-per-file.json"
MEASURED = HERE / ".celerylab" / "test-results" / "seconds-per-file.json"
NEW_FILE_SECONDS = 60.0


def file_weights() -> dict[str, float]:
    weights: dict[str, float] = {}
    for table in (COMMITTED, MEASURED):
        try:
            weights.update(json.loads(table.read_text()))
        except (OSError, ValueError):
            pass
    return weights


def pytest_collection_modifyitems(session, config, items):
    weights = file_weights()
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        first.setdefault(item.nodeid.split("::")[0], i)

    def key(item):
        path = item.nodeid.split("::")[0]
        return -weights.get(path, NEW_FILE_SECONDS), first[path]
    items.sort(key=key)  # stable: each file's own order is kept


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
    if hasattr(terminalreporter.config, "workerinput"):
        return  # an xdist worker: the controller has every file's figure
    try:  # this machine's figures, for the next run's order (files not run keep theirs)
        measured = json.loads(MEASURED.read_text()) if MEASURED.exists() else {}
        measured.update({path: round(seconds, 1) for path, seconds in _spent.items()})
        MEASURED.parent.mkdir(parents=True, exist_ok=True)
        MEASURED.write_text(json.dumps(dict(sorted(measured.items())), indent=1) + "\n")
    except OSError:
        pass
