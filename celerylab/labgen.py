"""Builds the notebooks from their one source each (``sources/*.py``, jupytext py:percent).

    sources/chNN_*.py   ->  notebooks/chNN_*.ipynb
    sources/labNN_*.py  ->  labs/labNN_*.ipynb       (solution regions replaced by a stub)
                       ->  solutions/labNN_*.ipynb  (markers removed)

A solution region is marked the nbgrader way, inside a code cell::

    ### BEGIN SOLUTION
    ...the answer...
    ### END SOLUTION

In the learner's copy it becomes ``raise NotImplementedError(...)`` at the same indentation.
Outputs are never written; cell ids are stable, so a rebuild with no source change is a no-op and
``build(check=True)`` (the drift test) reports any generated file that differs from its source.
"""

from __future__ import annotations

import re
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]
BEGIN = re.compile(r"^(\s*)### BEGIN SOLUTION\s*$")
END = re.compile(r"^\s*### END SOLUTION\s*$")
STUB = 'raise NotImplementedError("Your turn: replace this line with your code (see the hints above).")'
KERNEL = {"display_name": "Python 3 (celerylab)", "language": "python", "name": "python3"}


class SourceError(ValueError):
    pass


def split_solution(code: str, keep: bool, where: str) -> str:
    """The code with solution regions kept (markers dropped) or replaced by a stub."""
    out, inside = [], False
    for line in code.splitlines():
        begin = BEGIN.match(line)
        if begin:
            if inside:
                raise SourceError(f"{where}: nested BEGIN SOLUTION")
            inside = True
            if not keep:
                out.append(begin.group(1) + STUB)
        elif END.match(line):
            if not inside:
                raise SourceError(f"{where}: END SOLUTION without BEGIN")
            inside = False
        elif keep or not inside:
            out.append(line)
    if inside:
        raise SourceError(f"{where}: BEGIN SOLUTION without END")
    return "\n".join(out)


def _notebook(src: Path, keep: bool | None) -> str:
    nb = jupytext.read(src, fmt="py:percent")
    cells = []
    for i, cell in enumerate(nb.cells):
        source = cell.source
        if cell.cell_type == "code" and "### BEGIN SOLUTION" in source:
            if keep is None:
                raise SourceError(f"{src.name}: chapters have no solution regions")
            source = split_solution(source, keep, f"{src.name} cell {i}")
        make = nbformat.v4.new_code_cell if cell.cell_type == "code" else (
            nbformat.v4.new_markdown_cell if cell.cell_type == "markdown" else nbformat.v4.new_raw_cell)
        new = make(source)
        new.id = f"{src.stem[:20]}-{i:03d}"
        if cell.metadata.get("tags"):
            new.metadata["tags"] = list(cell.metadata["tags"])
        cells.append(new)
    out = nbformat.v4.new_notebook(cells=cells)
    out.metadata = {"kernelspec": KERNEL, "language_info": {"name": "python"}}
    return nbformat.writes(out) + "\n"


def targets(root: Path = ROOT) -> dict[Path, str]:
    """Every generated file and the text it should have."""
    want: dict[Path, str] = {}
    for src in sorted((root / "sources").glob("*.py")):
        if src.name.startswith("lab"):
            want[root / "labs" / f"{src.stem}.ipynb"] = _notebook(src, keep=False)
            want[root / "solutions" / f"{src.stem}.ipynb"] = _notebook(src, keep=True)
        else:
            want[root / "notebooks" / f"{src.stem}.ipynb"] = _notebook(src, keep=None)
    return want


def build(root: Path = ROOT, check: bool = False) -> list[Path]:
    """Write the generated notebooks; with ``check``, only list the ones that are out of date.

    Also lists generated notebooks whose source was removed (stale).
    """
    want = targets(root)
    stale = [p for d in ("notebooks", "labs", "solutions") for p in sorted((root / d).glob("*.ipynb"))
             if p not in want]
    changed = [p for p, text in want.items()
               if not p.exists() or p.read_text() != text] + stale
    if not check:
        for p in changed:
            if p in want:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(want[p])
            else:
                p.unlink()
    return changed
