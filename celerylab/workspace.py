"""The learner's own copies of the course notebooks: ``workspace/`` (git ignores it).

The course's notebooks (``notebooks/``, ``labs/``) are generated and tracked: ``./course build``
rewrites them and ``git pull`` updates them. A learner works in copies instead:

    workspace/notebooks/chNN_*.ipynb    the chapters, to change a setting and run again
    workspace/labs/labNN_*.ipynb        the labs, to solve
    workspace/.versions.json            for each copy, a fingerprint of the course version it came from
    workspace/backups/<time>/...        a learner's versions, saved before a reset or a restore

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


def _matches(name: str, wanted: str) -> bool:
    stem = Path(name).stem
    return stem == wanted or stem.startswith(wanted + "_")


def _choose(names: list[str] | None, every: list[str]) -> list[str]:
    if names is None:
        return every
    unknown = [x for x in names if not any(_matches(n, x) for n in every)]
    if unknown:
        from celerylab.errors import CourseError
        raise CourseError(f"No course notebook called {', '.join(unknown)}. Names look like "
                          "lab02 or ch03 (see ./course doctor).")
    return [n for n in every if any(_matches(n, x) for x in names)]


def backups_dir(ws: Path | None = None) -> Path:
    """Where a learner's versions go before a reset: inside the workspace, so JupyterLab's file
    browser shows them (and git ignores them with the rest of the workspace)."""
    return (ws or workspace_dir()) / "backups"


def _new_backup(ws: Path, backup_root: Path | None) -> Path:
    root = backup_root or backups_dir(ws)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = root / stamp, 1
    while folder.exists():  # two resets in one second keep both
        n += 1
        folder = root / f"{stamp}-{n}"
    return folder


def reset(names: list[str] | None = None, root: Path = ROOT, ws: Path | None = None,
          backup_root: Path | None = None) -> tuple[list[str], Path | None]:
    """Replace the learner's copies (``names``: notebook stems such as ``lab02`` or
    ``lab02_pool_and_concurrency``; None: all) with the course's current version, backing up every
    copy that differs first. Returns (the notebooks reset, the backup folder or None)."""
    ws = ws or workspace_dir()
    chosen = _choose(names, course_notebooks(root))
    return chosen, _replace(ws, {name: root / name for name in chosen},
                            _new_backup(ws, backup_root), course=root)


def _replace(ws: Path, sources: dict[str, Path], backup: Path, course: Path) -> Path | None:
    """Copy each source over the workspace copy ``name``, backing up a copy that differs."""
    versions = _versions(ws)
    used_backup = False
    for name, source in sources.items():
        mine = ws / name
        if mine.exists() and mine.read_bytes() != source.read_bytes():
            (backup / Path(name).parent).mkdir(parents=True, exist_ok=True)
            shutil.copy2(mine, backup / name)
            used_backup = True
        mine.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, mine)
        # what it was copied from is the course's version: a restored answer shows as edited
        fp = _fingerprint(course / name if (course / name).exists() else source)
        versions[name] = {"course": fp, "copy": fp}
    _save_versions(ws, versions)
    return backup if used_backup else None


def backups(ws: Path | None = None, backup_root: Path | None = None) -> list[tuple[str, list[str]]]:
    """(backup folder name, the notebooks in it), oldest first."""
    root = backup_root or backups_dir(ws)
    found = []
    for folder in sorted(p for p in root.glob("*") if p.is_dir()):
        found.append((folder.name, sorted(p.relative_to(folder).as_posix()
                                          for p in folder.rglob("*.ipynb"))))
    return found


def restore(names: list[str], which: str | None = None, root: Path = ROOT,
            ws: Path | None = None, backup_root: Path | None = None) -> tuple[list[str], Path | None]:
    """Put back the learner's backed-up version of each notebook in ``names`` (from the backup
    folder ``which``, else the newest that has it). The copy it replaces is backed up first.
    Returns (the notebooks restored, the backup of what they replaced or None)."""
    from celerylab.errors import CourseError
    ws = ws or workspace_dir()
    folders = [f for f, _ in backups(ws, backup_root)]
    if which is not None and which not in folders:
        raise CourseError(f"No backup called {which!r}. ./course backups lists them.")
    broot = backup_root or backups_dir(ws)
    sources = {}
    for wanted in names:
        for folder in ([which] if which else reversed(folders)):
            hits = [p for p in (broot / folder).rglob("*.ipynb") if _matches(p.name, wanted)]
            if hits:
                for hit in hits:
                    sources[hit.relative_to(broot / folder).as_posix()] = hit
                break
        else:
            raise CourseError(f"No backup of {wanted}"
                              + (f" in {which}" if which else "") + ". ./course backups lists them.")
    backup = _new_backup(ws, backup_root)
    return sorted(sources), _replace(ws, sources, backup, course=root)
