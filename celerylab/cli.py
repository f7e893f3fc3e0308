"""``python -m celerylab <command>``: what ./course runs after setting up the virtualenv.

    open     check the machine can run the course, then start JupyterLab on 127.0.0.1 (token on)
    test     the whole test suite (pytest; notebooks in parallel)
    doctor   what is installed, what answers, what is left running
    preflight  is this laptop ready for a workshop? one line per problem with its fix; exit 0 if so
    reset    stop what the course left running (of kernels that are gone) and delete its
             runtime files; NAME...: restore your workspace copy of those notebooks, --labs: of
             all of them (yours are backed up to workspace/backups/ first; nothing running is
             touched)
    backups  list the backups of your notebooks; restore NAME [--from FOLDER]: put one back
    build    regenerate notebooks/, labs/ and solutions/ from sources/ (--check: only report drift)
    bench    print the figures of docs/benchmarks.md; --soak N [--hog K]: the suite N times in a
             row (K busy loops beside it), pass/fail per run
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from celerylab.errors import CourseError
from celerylab.processes import pid_alive

ROOT = Path(__file__).resolve().parents[1]


def workspace_dir() -> Path:
    from celerylab.workspace import workspace_dir as ws
    return ws()


def lab_root_and_start() -> tuple[Path, str]:
    """JupyterLab's root folder, the learner's workspace (their copies of the chapters and labs,
    and the backups of them), and the first notebook, relative to it. The course's own folders
    (generated notebooks, solutions, sources, tests) stay out of the file browser."""
    return workspace_dir().resolve(), "notebooks/ch00_setup.ipynb"




def _preflight() -> str:
    """Prove a course Redis can start here (or REDIS_URL answers); return a one-line summary."""
    from celerylab.broker import RedisServer, check_reachable, redact
    from celerylab.processes import home

    if os.environ.get("REDIS_URL"):
        check_reachable(os.environ["REDIS_URL"]).close()
        return f"using REDIS_URL={redact(os.environ['REDIS_URL'])} (opt-in)"
    server = RedisServer(home() / "run" / f"preflight-{os.getpid()}")
    t0 = time.monotonic()
    server.start()
    took = time.monotonic() - t0
    server.stop()
    shutil.rmtree(server.rundir, ignore_errors=True)
    return (f"course Redis OK: {server.binary} (from {server.source}) answered in {took:.2f} s; "
            "each notebook starts its own on a free 127.0.0.1 port")


def _free_port(start: int) -> int:
    import socket
    for port in range(start, start + 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise CourseError(f"No free port in {start}-{start + 99} for JupyterLab; set "
                      "CELERYLAB_JUPYTER_PORT to a free one.")


# JupyterLab settings the course ships (the app directory's overrides.json, read before a user's
# own settings): no "get notified about Jupyter news?" prompt, and no calls to the internet.
LAB_OVERRIDES = {"@jupyterlab/apputils-extension:notification": {
    "fetchNews": "false", "checkForUpdates": False}}


def install_lab_overrides(prefix: str = sys.prefix) -> Path:
    """Merge the course's JupyterLab settings into <prefix>/share/jupyter/lab/settings."""
    import json
    path = Path(prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        current = json.loads(path.read_text())
    except (OSError, ValueError):
        current = {}
    for plugin, values in LAB_OVERRIDES.items():
        current.setdefault(plugin, {}).update(values)
    path.write_text(json.dumps(current, indent=2) + "\n")
    return path


def _workspace_news(report) -> list[str]:
    """Lines worth telling a learner about their workspace copies."""
    lines = []
    copied = [c.name for c in report if c.state == "copied"]
    if copied:
        lines.append(f"copied {len(copied)} notebook(s) into your workspace "
                     f"({workspace_dir().name}/): work there; updates and ./course build "
                     "never touch it")
    for c in report:
        if c.newer or c.state == "missing from the course":
            lines.append(f"{c.name}: {c.describe()}")
    return lines


def cmd_open(args) -> int:
    from celerylab.workspace import sync
    print(f"celerylab: {_preflight()}", flush=True)
    try:
        install_lab_overrides()
    except OSError:  # a read-only prefix (the Docker image, run as the host user: set at build)
        pass
    for line in _workspace_news(sync()):
        print(f"celerylab: {line}", flush=True)
    port = int(os.environ.get("CELERYLAB_JUPYTER_PORT") or 0) or _free_port(8888)
    token = os.environ.get("JUPYTER_TOKEN") or secrets.token_hex(24)
    ip = os.environ.get("CELERYLAB_JUPYTER_IP", "127.0.0.1")  # 0.0.0.0 only inside Docker
    root, start = lab_root_and_start()
    cmd = [sys.executable, "-m", "jupyter", "lab", f"--ServerApp.ip={ip}",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--ServerApp.root_dir={root}", f"--ServerApp.default_url=/lab/tree/{start}"]
    if args.no_browser or os.environ.get("CI") or os.environ.get("CELERYLAB_NO_BROWSER"):
        cmd.append("--ServerApp.open_browser=False")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers and CI run as root
    env = {**os.environ, "JUPYTER_TOKEN": token}  # the token stays on, and off the command line
    lab = subprocess.Popen(cmd, env=env, cwd=ROOT)

    def forward(_signum, _frame):
        # SIGTERM either way: JupyterLab asks for confirmation on a SIGINT when it has a terminal,
        # and ignores a lone SIGINT when it has none (kill -INT from a script, CI).
        lab.send_signal(signal.SIGTERM)

    # installed at once: a signal that arrives while JupyterLab starts must stop it too, not
    # end this process and leave JupyterLab running on its own
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    url = f"http://127.0.0.1:{port}/lab/tree/{start}?token={token}"
    deadline = time.monotonic() + 60
    while lab.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}",
                                        timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    if lab.poll() is not None:
        print(f"celerylab: JupyterLab exited (code {lab.returncode}); see its messages above. "
              f"Is port {port} free? Set CELERYLAB_JUPYTER_PORT to another.", file=sys.stderr)
        return 1
    print(f"\n  The course is open:  {url}\n  It opens {start} of your workspace ({root}). "
          "Stop with Ctrl-C (every worker and Redis the notebooks started stops too).\n",
          flush=True)

    try:
        code = lab.wait()
    except KeyboardInterrupt:
        lab.terminate()
        code = lab.wait()
    left = [p for p in course_processes() if not p.live]
    print(f"\ncelerylab: stopped JupyterLab, its kernels and the workers and Redis servers they "
          f"started{f' ({len(left)} still stopping: ./course reset)' if left else ''}. "
          f"Your work is saved in {root} (notebooks you saved; "
          "JupyterLab also saves every two minutes). ./course open continues where you left off.",
          flush=True)
    return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code


def cmd_test(args) -> int:
    """pytest over tests/ plus every chapter and solution notebook under nbval, four files at a
    time. The suite mostly waits: since workers fork from a launcher that imported celery once,
    and packages are installed with their bytecode, four at a time take about 460 s here (two at
    a time took 927 s before; see docs/benchmarks.md, sessions 14 and 15). ``-n 2`` (or ``-n 0``)
    on a slower machine."""
    import pytest
    extra = list(args.pytest_args)
    if not any(a.startswith("-n") for a in extra):
        extra = ["-n", "4", "--dist", "loadfile", "--no-loadscope-reorder", *extra]  # conftest.COST
    if not any(a.startswith("--durations") for a in extra):
        extra = ["--durations=15", *extra]  # the slowest items; conftest.py adds each file's total
    paths = [a for a in extra if Path(a.split("::")[0]).exists()]  # ./course test tests/x.py
    if not paths and not any(a.startswith("--junitxml") for a in extra):
        from celerylab.observe import results_file  # the whole suite's outcomes, for chapter 7
        results_file().parent.mkdir(parents=True, exist_ok=True)
        extra = [f"--junitxml={results_file()}", *extra]
    code = pytest.main([*(paths or [str(ROOT / d) for d in ("tests", "notebooks", "solutions")]),
                        "--nbval", "--nbval-current-env", "--nbval-cell-timeout=120", *extra])
    left = course_processes()
    if left:
        print("celerylab: processes left running after the tests (a cleanup bug):\n"
              + "\n".join(f"  {p.pid} {p.command}" for p in left), file=sys.stderr)
        return int(code) or 1
    return int(code)


def cmd_build(args) -> int:
    from celerylab.labgen import build
    changed = build(check=args.check)
    for p in changed:
        print(("out of date: " if args.check else "wrote: ") + str(p.relative_to(ROOT)))
    if args.check and changed:
        print("Run ./course build (or make labs) and commit the result.", file=sys.stderr)
        return 1
    if not changed:
        print("notebooks, labs and solutions are up to date with sources/")
    return 0


@dataclass
class CourseProcess:
    """A live process the course started, from its pid note."""
    pid: int
    command: str
    owner: int  # the kernel (or command) that started it
    notebook: str
    since: float

    @property
    def live(self) -> bool:
        """Its kernel still runs: a notebook in use, not a leftover."""
        return pid_alive(self.owner)


def course_processes() -> list[CourseProcess]:
    """Live processes the course started, from its pid notes (notes of dead ones are removed)."""
    from celerylab.processes import home
    found = []
    for note in sorted((home() / "pids").glob("*")):
        pid = int(note.name)
        if not pid_alive(pid):
            note.unlink(missing_ok=True)
            continue
        lines = note.read_text().splitlines() + ["", ""]
        owner, _, command = lines[0].partition(" ")
        notebook, _, since = lines[1].partition(" ")
        found.append(CourseProcess(pid, command.strip(), int(owner or 0), notebook or "-",
                                   float(since or 0)))
    return found


def leftovers() -> list[CourseProcess]:
    return [p for p in course_processes() if not p.live]


def describe_live(processes: list[CourseProcess]) -> list[str]:
    """One line per live notebook: which, its kernel, since when, what it runs."""
    by_owner: dict[tuple[int, str], list[CourseProcess]] = {}
    for p in processes:
        by_owner.setdefault((p.owner, p.notebook), []).append(p)
    lines = []
    for (owner, notebook), procs in sorted(by_owner.items()):
        since = time.strftime("%H:%M", time.localtime(min(p.since for p in procs)))
        lines.append(f"{notebook} (kernel pid {owner}, since {since}): "
                     + ", ".join(f"{Path(p.command).name} {p.pid}" for p in procs))
    return lines


def cmd_reset(args) -> int:
    """Names or --labs: restore workspace copies only (nothing running is touched). Alone:
    stop what is left of kernels that are gone and delete their runtime files."""
    if args.labs or args.names:
        from celerylab.workspace import reset
        done, backup = reset(None if args.labs else args.names)
        print(f"restored {len(done)} notebook(s) in your workspace to the course's version")
        _tell_backup(backup)
        print("nothing running was touched: a notebook open on it keeps its kernel; reload it "
              "in JupyterLab (File > Reload Notebook from Disk) to see the fresh copy")
        return 0
    from celerylab.processes import home
    from celerylab.watchdog import terminate
    everything = course_processes()
    left = [p for p in everything if not p.live]
    live = [p for p in everything if p.live]
    terminate({p.pid for p in left})
    print(f"stopped {len(left)} leftover process(es) (their kernels are gone)" if left
          else "nothing was left running")
    owners = {p.owner for p in live}
    for rundir in (home() / "run").glob("*"):  # <namespace>-<kernel pid>
        owner = rundir.name.rsplit("-", 1)[-1]
        if not (owner.isdigit() and (int(owner) in owners or pid_alive(int(owner)))):
            shutil.rmtree(rundir, ignore_errors=True)
    if live:
        print("left alone, in use by notebooks whose kernels run:\n  "
              + "\n  ".join(describe_live(live))
              + "\n  (shut those kernels down in JupyterLab to stop them)")
        return 0
    removed = [p for d in ("notebooks", "labs", "solutions") for pattern in ("*_tasks.py", "shop_*.py")
               for p in (ROOT / d).glob(pattern)]
    for p in removed:
        p.unlink()
    print(f"deleted runtime files and {len(removed)} generated task module(s)")
    return 0


def _tell_backup(backup: Path | None) -> None:
    if backup is None:
        print("(no copy differed from the course's: nothing needed a backup)")
        return
    shown = backup.relative_to(ROOT) if backup.is_relative_to(ROOT) else backup
    print(f"your versions were backed up to {shown}/ (JupyterLab's file browser shows it)\n"
          f"  get one back: ./course restore NAME --from {backup.name}   "
          "(./course backups lists every backup)")


def cmd_backups(args) -> int:
    from celerylab.workspace import backups, backups_dir
    found = backups()
    if not found:
        print(f"no backups yet (./course reset NAME makes one in {backups_dir()})")
        return 0
    print(f"backups in {backups_dir()} (newest last):")
    for folder, names in found:
        print(f"  {folder}: {', '.join(Path(n).stem for n in names)}")
    print("get one back: ./course restore NAME [--from FOLDER]  (default: the newest that has it)")
    return 0


def cmd_restore(args) -> int:
    from celerylab.workspace import restore
    done, backup = restore(args.names, args.source)
    print(f"restored your version of {', '.join(Path(n).stem for n in done)} into your workspace")
    if backup is not None:
        _tell_backup(backup)
    return 0


def cmd_doctor(args) -> int:
    import importlib.metadata as md
    good = True
    print(f"python   {sys.version.split()[0]} ({sys.executable})")
    for pkg in ("celery", "kombu", "redis", "jupyterlab", "ipywidgets", "matplotlib", "nbval"):
        try:
            print(f"{pkg:<11}{md.version(pkg)}")
        except md.PackageNotFoundError:
            good = False
            print(f"{pkg:<11}MISSING -> ./course setup")
    try:
        print(f"broker   {_preflight()}")
    except CourseError as exc:
        good = False
        print(f"broker   PROBLEM: {exc}")
    from celerylab.rabbit import rabbitmq_status
    print(f"rabbitmq {rabbitmq_status()[1]}")
    everything = course_processes()
    left = [p for p in everything if not p.live]
    for line in describe_live([p for p in everything if p.live]):
        print(f"live     {line}")
    print("left     " + (", ".join(f"{p.pid} {p.command} (of {p.notebook})" for p in left)
                         + "  -> ./course reset (touches nothing live)"
                         if left else "nothing left running (kernels gone)"))
    from celerylab.labgen import build
    drift = build(check=True)
    print("course   " + ("generated notebooks match sources/" if not drift else
                         f"{len(drift)} generated notebook(s) differ from sources/ (a maintainer's "
                         "edit: ./course build)"))
    from celerylab.workspace import sync
    report = sync()
    edited = [Path(c.name).stem for c in report if c.state == "edited"]
    newer = [Path(c.name).stem for c in report if c.newer]
    print(f"workspace {workspace_dir()}: {len(report)} notebooks; edited by you: "
          f"{', '.join(edited) or 'none'}")
    if newer:
        print(f"         newer course version of: {', '.join(newer)} -> ./course reset NAME "
              "takes it (yours is backed up first)")
    return 0 if good else 1


def cmd_preflight(args) -> int:
    from celerylab.preflight import run
    return run()


def cmd_bench(args) -> int:
    from celerylab.bench import main as bench
    from celerylab.bench import soak
    if args.soak:
        return soak(args.soak, args.hog)
    if args.record_burst:
        from celerylab.bench import record_burst
        record_burst()
        return 0
    return bench(args.notebooks or bool(args.only), args.suite, args.hog, args.only)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="celerylab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("open")
    p.add_argument("--no-browser", action="store_true")
    p.set_defaults(fn=cmd_open)
    sub.add_parser("test", help="extra arguments go to pytest").set_defaults(fn=cmd_test)
    p = sub.add_parser("build")
    p.add_argument("--check", action="store_true")
    p.set_defaults(fn=cmd_build)
    p = sub.add_parser("reset")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="restore your workspace copy of these notebooks (lab02, ch03, ...)")
    p.add_argument("--labs", action="store_true",
                   help="restore every notebook of your workspace (backs up your versions)")
    p.set_defaults(fn=cmd_reset)
    sub.add_parser("backups", help="list the backups of your notebooks").set_defaults(
        fn=cmd_backups)
    p = sub.add_parser("restore", help="put back your backed-up version of notebooks")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--from", dest="source", metavar="FOLDER",
                   help="the backup folder (default: the newest that has the notebook)")
    p.set_defaults(fn=cmd_restore)
    sub.add_parser("doctor").set_defaults(fn=cmd_doctor)
    sub.add_parser("preflight").set_defaults(fn=cmd_preflight)
    p = sub.add_parser("bench")
    p.add_argument("--notebooks", action="store_true", help="also time every notebook")
    p.add_argument("--only", metavar="NAMES", default="",
                   help="with --notebooks: only the notebooks whose names contain one of these "
                        "(comma-separated: ch10,lab10)")
    p.add_argument("--suite", action="store_true", help="also time the whole test suite")
    p.add_argument("--soak", type=int, metavar="N", default=0,
                   help="run the whole suite N times in a row; print pass/fail per run")
    p.add_argument("--record-burst", action="store_true",
                   help="record an ordinary burst's readings for labs 7 and 8 and the rules' "
                        "unit test (celerylab/monitoring/burst-trace.json)")
    p.add_argument("--hog", type=int, metavar="K", default=0,
                   help="K busy-loop processes beside the soak, or beside the figures and "
                        "--notebooks (times as a busy laptop sees them)")
    p.set_defaults(fn=cmd_bench)
    args, rest = parser.parse_known_args(argv)
    if rest and args.fn is not cmd_test:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.pytest_args = rest
    try:
        return args.fn(args)
    except CourseError as exc:
        print(f"celerylab: {exc}", file=sys.stderr)
        return 1
