"""``celery``, exactly as its own command runs, minus the command-line extras a worker never uses;
and a launcher that starts each worker already past its imports.

Celery's command imports every ``celery.commands`` entry point when it starts (Flower, installed
for chapter 7, registers one) and the interactive shell of ``celery amqp`` (``click_repl``, which
loads prompt_toolkit). Together they cost about 0.4 s of CPU per worker boot on the reference
machine, a third of a boot, and chapter 6 alone boots 26 workers. The course's workers run
``celery ... worker`` only, so this module leaves both out, then calls Celery's own ``main()``:
the same options, bootsteps and process tree as ``celery`` itself. ``Worker.command`` shows the
command a learner would type.

Even then, importing celery, kombu and redis is 0.9 s of the 1.05 s of CPU a boot costs. So a
kernel's workers are forked from a **launcher** (``python -m celerylab.celery_worker --serve``,
one per kernel) that imported them once: each worker is still its own OS process, in its own
session, that runs Celery's own ``main()`` with the worker's whole command line, environment and
folder, and forks its prefork pool as usual. Only the imports are shared. The launcher never
imports a task module (the worker does, after the fork, from its own folder), exits when its
kernel does, and writes each worker's exit status to a file for ``Launched.poll``.
``CELERYLAB_WORKER_LAUNCH=exec`` starts every worker as a fresh ``python`` instead; pools other
than prefork, solo and threads (gevent and eventlet patch the standard library before anything
imports it) always do.
"""

import importlib.metadata as metadata
import os
import sys
import types

_entry_points = metadata.entry_points
FORKABLE_POOLS = ("prefork", "solo", "threads")


def _without_cli_plugins(*args, **kwargs):
    if kwargs.get("group") == "celery.commands":
        return metadata.EntryPoints(())
    return _entry_points(*args, **kwargs)


def _prepare():
    """Leave out the CLI plugins and `celery amqp`'s shell; return Celery's own ``main``."""
    metadata.entry_points = _without_cli_plugins  # read once, when celery.bin.celery is imported
    repl = types.ModuleType("click_repl")  # `celery amqp`'s interactive shell: not for a worker
    repl.register_repl = lambda group, name="repl": None
    sys.modules.setdefault("click_repl", repl)
    from celery.__main__ import main
    return main


# The launcher ---------------------------------------------------------------------------------
def import_worker():
    """Import what every boot imports (measured with -X importtime): Celery's command, the
    worker, its pool, its transport and result backend. Returns Celery's own ``main``."""
    main = _prepare()
    import billiard.pool  # noqa: F401
    import celery.app.trace  # noqa: F401
    import celery.apps.worker  # noqa: F401
    import celery.backends.redis  # noqa: F401
    import celery.concurrency.prefork  # noqa: F401
    import celery.worker.consumer  # noqa: F401
    import celery.worker.strategy  # noqa: F401
    import kombu.transport.redis  # noqa: F401
    return main


def serve(hide: tuple[str, ...] = ()) -> None:
    """Read one JSON request a line (argv, env, cwd, log, exit); fork a worker for each; answer
    its pid. Ends at end-of-file: its kernel is gone (the watchdog stops the workers).
    ``hide``: entries of ``sys.path`` a fresh ``python`` would not have (a forked launcher's)."""
    import json
    import signal

    main = import_worker()
    exits: dict[int, str] = {}

    def reap(*_):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            path = exits.pop(pid, None)
            if path:
                try:
                    with open(path + ".tmp", "w") as f:
                        f.write(str(os.waitstatus_to_exitcode(status)))
                    os.replace(path + ".tmp", path)
                except OSError:
                    pass

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an interrupt in the kernel is not ours
    signal.signal(signal.SIGCHLD, reap)
    base_path = [p for p in sys.path if p not in ("", os.getcwd(), *hide)]
    requests, answers = sys.stdin, sys.stdout
    print("ready", file=answers, flush=True)
    for line in requests:
        request = json.loads(line)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # reap only once it is known
        pid = os.fork()
        if pid == 0:
            _become_worker(request, main, base_path)  # does not return
        exits[pid] = request["exit"]
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        print(pid, file=answers, flush=True)


def _become_worker(request: dict, main, base_path: list[str]) -> None:
    """In the forked child: the process a fresh ``python -m celerylab.celery_worker`` would be."""
    import atexit
    import importlib
    import signal
    try:
        os.setsid()
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        atexit._clear()  # not the launcher's (or its parent's): a fresh process has none
        import logging
        atexit.register(logging.shutdown)  # as a fresh one has (logging registers it at import)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        # fresh standard streams on the log, as a fresh python has (whatever the parent had)
        sys.stdin = sys.__stdin__ = open(os.devnull)
        sys.stdout = sys.__stdout__ = open(1, "w", closefd=False)
        sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False)
        try:  # what ps shows until Celery names the process itself (before the environment
            from setproctitle import setproctitle  # changes: it needs the original layout)
            setproctitle(" ".join([sys.executable, "-m", "celerylab.celery_worker",
                                   *request["argv"]]))
        except ImportError:
            pass
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [request["cwd"], *extra, *(p for p in base_path if p not in extra)]
        importlib.invalidate_caches()
        sys.argv = [__file__, *request["argv"]]
    except BaseException as exc:  # the fork could not become a worker: say why, in its log
        os.write(2, f"celerylab launcher: {exc!r}\n".encode())
        os._exit(1)
    # Celery's own main; it ends with sys.exit. Then exit as a fresh interpreter would (its
    # threads, its atexit handlers, its status), never back into the launcher's code.
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    try:
        import threading
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        _prepare()()
