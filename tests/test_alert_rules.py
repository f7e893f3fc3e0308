"""The alert rules, unit-tested with promtool (the situations a team meets: an ordinary burst, a
busy healthy queue, a stall and its recovery, a frozen worker holding its messages on Celery's
default prefetch, unstamped messages, the exporter gone), and the recorded burst they replay."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from celerylab import observe

HERE = observe.RULES_FILE.parent
TRACE = json.loads((HERE / "burst-trace.json").read_text())


def test_the_rules_pass_their_promtool_unit_tests():
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool is not installed (Debian's prometheus package; .ci/run installs it)")
    done = subprocess.run([promtool, "test", "rules", "celerylab-alerts.test.yml"], cwd=HERE,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_the_rules_tests_cover_every_rule_and_replay_the_recorded_burst():
    rules = {r["alert"] for g in yaml.safe_load(observe.RULES_FILE.read_text())["groups"]
             for r in g["rules"]}
    tests = yaml.safe_load((HERE / "celerylab-alerts.test.yml").read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"]
             if case["exp_alerts"]}
    assert fired == rules, f"every rule is shown firing at least once: {rules - fired} are not"
    burst = next(t for t in tests if "burst" in t["name"])
    assert burst["interval"] == f"{int(TRACE['tick_seconds'] * 1000)}ms"
    ages = next(s["values"] for s in burst["input_series"]
                if s["series"].startswith("celerylab_queue_oldest_age_seconds"))
    recorded = ["0" if a is None else f"{a:g}" for _, a in TRACE["readings"]]
    assert ages.split() == recorded, "the rules' burst is the recorded one: copy it again"


def test_the_recorded_burst_is_an_ordinary_one():
    """Recorded from a real run (its date and machine kept), deep, its oldest reaching 1.5-2 s,
    drained by the end: what labs 7 and 8 call an ordinary burst."""
    readings = TRACE["readings"]
    assert TRACE["recorded"] and TRACE["machine"] and "--record-burst" in TRACE["how"]
    peak = max(a for _, a in readings if a is not None)
    assert 1.5 <= peak <= 2.0 and max(d for d, _ in readings) >= 100
    assert readings[-1] == [0, None]


def test_every_test_chapter_7_names_for_a_guideline_exists():
    """Chapter 7's guideline table reads these node ids' results from a run: each must be a test
    the suite collects, or the table would say "no run" forever."""
    import re
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    source = (root / "sources" / "ch07_observability_and_lag.py").read_text()
    nodes = re.findall(r'"(tests/test_\w+\.py::[^"]+)"', source)
    assert len(nodes) >= 7
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                           "no:cacheprovider", *nodes], cwd=root, capture_output=True, text=True,
                          timeout=120)
    collected = {line.strip() for line in done.stdout.splitlines()}
    assert set(nodes) <= collected, sorted(set(nodes) - collected)
