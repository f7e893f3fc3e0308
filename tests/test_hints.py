"""Progressive hints: three per lab, given in order, behind a button too; none contains a line of
the lab's solution code (nor of any other lab's)."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

from celerylab.checks import hints

LABS = sorted(p.stem[:5] for p in (ROOT / "labs").glob("lab*.ipynb"))


def solution_lines() -> dict[str, set[str]]:
    """Every meaningful code line inside the solution regions of each lab's source."""
    out: dict[str, set[str]] = {}
    for src in sorted((ROOT / "sources").glob("lab*.py")):
        lines = set()
        for region in re.findall(r"### BEGIN SOLUTION\n(.*?)### END SOLUTION", src.read_text(),
                                 re.S):
            for line in region.splitlines():
                code = line.split("#", 1)[0].strip()  # comments are prose, not the answer
                if len(code) >= 8 and code not in ("return out", "return results"):
                    lines.add(code)
        out[src.stem[:5]] = lines
    return out


def test_every_lab_has_three_hints():
    assert LABS and set(LABS) == set(hints.HINTS)
    for lab in LABS:
        assert len(hints.HINTS[lab]) == 3
        assert all(len(h) > 40 for h in hints.HINTS[lab])


@pytest.mark.parametrize("lab", sorted(hints.HINTS))
def test_no_hint_contains_solution_code(lab):
    every = solution_lines()
    assert every[lab], f"no solution code found for {lab}"
    for text in hints.HINTS[lab]:
        squashed = re.sub(r"\s+", "", text)
        for other, lines in every.items():
            for code in lines:
                assert re.sub(r"\s+", "", code) not in squashed, (lab, other, code)


def test_hints_come_in_order_and_stop_at_the_last(capsys, monkeypatch):
    monkeypatch.setattr(hints, "_given", {})
    first = hints.hint("lab03")
    second = hints.hint("lab03")
    third = hints.hint("lab03")
    again = hints.hint("lab03")
    assert first.startswith("Hint 1 of 3") and second.startswith("Hint 2 of 3")
    assert third.startswith("Hint 3 of 3") and again == third
    assert "again for hint 2" in first and "again" not in third
    assert hints.hint("lab03", 1) == first
    with pytest.raises(ValueError):
        hints.hint("lab99")


def test_the_hint_button_shows_the_next_hint_and_then_stops(monkeypatch):
    monkeypatch.setattr(hints, "_given", {})
    box = hints.hint_button("lab01")
    button, out = box.children
    for _ in range(3):
        button.click()
    assert button.disabled and button.description == "no more hints"
    assert hints._given["lab01"] == 3
