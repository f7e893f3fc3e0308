"""The learner's own copies of the course notebooks: ``workspace/`` (git ignores it).

The course's notebooks (``notebooks/``, ``labs/``) are generated and tracked: ``./course build``
rewrites them and ``git pull`` updates them. A learner works in copies instead:

    workspace/notebooks/chNN_*.ipynb    the chapters, to change a setting and run again
    workspace/labs/labNN_*.ipynb        the labs, to solve
    workspace/.versions.json            for each copy, a fingerprint of the course version it came from

``sync`` (run by ``./course open``) copies what the workspace does not have yet and never
overwrites a copy. It reports, per notebook, whether the learner edited it and whether the course
has a newer version than the one it was copied from; ``reset`` replaces copies with the current
course version after backing the learner's up.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("notebooks", "labs")


def workspace_dir() -> Path:
    return Path(os.environ.get("CELERYLAB_WORKSPACE") or ROOT / "workspace")


def _fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@dataclass
class Copy:
    """One notebook of the course and the learner's copy of it."""

    name: str  # e.g. "labs/lab02_pool_and_concurrency.ipynb"
    state: str  # "copied" (just now), "fresh", "edited", "missing from the course"
    newer: bool = False  # the course has changed it since it was copied

    def describe(self) -> str:
        text = {"copied": "copied into your workspace", "fresh": "as copied",
                "edited": "edited by you",
                "missing from the course": "yours only (no longer in the course)"}[self.state]
        if self.newer:
            text += (f"; the course has a newer version: ./course reset {Path(self.name).stem} "
                     "takes it (yours is backed up first)")
        return text


def _versions(ws: Path) -> dict:
    try:
        return json.loads((ws / ".versions.json").read_text())
    except (OSError, ValueError):
        return {}


def _save_versions(ws: Path, versions: dict) -> None:
    (ws / ".versions.json").write_text(json.dumps(versions, indent=1, sort_keys=True) + "\n")


def course_notebooks(root: Path = ROOT) -> list[str]:
    return sorted(f"{d}/{p.name}" for d in SECTIONS for p in (root / d).glob("*.ipynb"))


def sync(root: Path = ROOT, ws: Path | None = None) -> list[Copy]:
    """Copy every course notebook the workspace lacks; never overwrite one. Report on each."""
    ws = ws or workspace_dir()
    versions = _versions(ws)
    report = []
    for name in course_notebooks(root):
        source, mine = root / name, ws / name
        course = _fingerprint(source)
        if not mine.exists():
            mine.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, mine)
            versions[name] = {"course": course, "copy": course}
            report.append(Copy(name, "copied"))
            continue
        base = versions.get(name) or {"course": None, "copy": None}
        edited = _fingerprint(mine) != base["copy"]
        report.append(Copy(name, "edited" if edited else "fresh", newer=course != base["course"]))
    gone = sorted(set(versions) - set(course_notebooks(root)))
    report += [Copy(name, "missing from the course") for name in gone if (ws / name).exists()]
    _save_versions(ws, versions)
    return report


def reset(names: list[str] | None = None, root: Path = ROOT, ws: Path | None = None,
          backup_root: Path | None = None) -> tuple[list[str], Path | None]:
    """Replace the learner's copies (``names``: notebook stems such as ``lab02`` or
    ``lab02_pool_and_concurrency``; None: all) with the course's current version, backing up every
    copy that differs first. Returns (the notebooks reset, the backup folder or None)."""
    from celerylab.processes import home
    ws = ws or workspace_dir()
    versions = _versions(ws)
    every = course_notebooks(root)
    if names is None:
        chosen = every
    else:
        chosen = [n for n in every if any(Path(n).stem == x or Path(n).stem.startswith(x + "_")
                                          for x in names)]
        unknown = [x for x in names if not any(Path(n).stem == x or
                                               Path(n).stem.startswith(x + "_") for n in every)]
        if unknown:
            from celerylab.errors import CourseError
            raise CourseError(f"No course notebook called {', '.join(unknown)}. Names look like "
                              "lab02 or ch03 (see ./course doctor).")
    backup = (backup_root or home() / "backup") / time.strftime("%Y%m%d-%H%M%S")
    used_backup = False
    for name in chosen:
        source, mine = root / name, ws / name
        if mine.exists() and mine.read_bytes() != source.read_bytes():
            (backup / Path(name).parent).mkdir(parents=True, exist_ok=True)
            shutil.copy2(mine, backup / name)
            used_backup = True
        mine.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, mine)
        fp = _fingerprint(source)
        versions[name] = {"course": fp, "copy": fp}
    _save_versions(ws, versions)
    return chosen, backup if used_backup else None
