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
    import billiard.popen_fork  # noqa: F401
    import billiard.sharedctypes  # noqa: F401
    import billiard.synchronize  # noqa: F401
    import celery.app.control  # noqa: F401
    import celery.app.events  # noqa: F401
    import celery.app.log  # noqa: F401
    import celery.app.trace  # noqa: F401
    import celery.apps.worker  # noqa: F401
    import celery.backends.redis  # noqa: F401
    import celery.bin.celery  # noqa: F401  (the command; it builds pygments' lexer once, here)
    import celery.concurrency.prefork  # noqa: F401
    import celery.events.dispatcher  # noqa: F401
    import celery.worker.autoscale  # noqa: F401
    import celery.worker.components  # noqa: F401
    import celery.worker.consumer  # noqa: F401
    import celery.worker.consumer.delayed_delivery  # noqa: F401
    import celery.worker.strategy  # noqa: F401
    import kombu.pidbox  # noqa: F401
    import kombu.transport.redis  # noqa: F401
    return main


def serve(hide: tuple[str, ...] = ()) -> None:
    """Read one JSON request a line (id, argv, env, cwd, log, exits: a folder); fork a worker for
    each; answer "<id> <pid>". When its input ends (its kernel is gone) or on SIGTERM, it asks
    the workers it started and that still run to stop (the watchdog escalates), then exits.
    ``hide``: entries of ``sys.path`` a fresh ``python`` would not have (a forked launcher's)."""
    import json
    import signal

    main = import_worker()
    try:  # set process titles up while the environment is the original (titles use its room)
        import setproctitle
        setproctitle.setproctitle(setproctitle.getproctitle())
    except ImportError:
        pass
    children: dict[int, str] = {}  # running workers: pid -> where its exit status goes

    def reap(*_):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            path = children.pop(pid, None)
            if path:
                try:
                    with open(path + ".tmp", "w") as f:
                        f.write(str(os.waitstatus_to_exitcode(status)))
                    os.replace(path + ".tmp", path)
                except OSError:
                    pass

    def end(*_):
        for pid in list(children):
            try:
                os.killpg(pid, signal.SIGTERM)
            except OSError:
                pass
        os._exit(0)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an interrupt in the kernel is not ours
    signal.signal(signal.SIGCHLD, reap)
    signal.signal(signal.SIGTERM, end)
    base_path = [p for p in sys.path if p not in ("", os.getcwd(), *hide)]
    requests, answers = sys.stdin, sys.stdout
    print("ready", file=answers, flush=True)
    for line in requests:
        request = json.loads(line)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # reap only once it is known
        pid = os.fork()
        if pid == 0:
            _become_worker(request, main, base_path)  # does not return
        children[pid] = os.path.join(request["exits"], f"{pid}.exit")
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        print(request["id"], pid, file=answers, flush=True)
    end()


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
        # the exit handlers a fresh worker would have by now, not the launcher's (or its parent's)
        atexit._clear()
        import logging
        import weakref
        atexit.register(logging.shutdown)
        if "multiprocessing.util" in sys.modules:
            atexit.register(sys.modules["multiprocessing.util"]._exit_function)
        weakref.finalize._registered_with_atexit = False
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        # fresh standard streams on the log, as a fresh python makes them (PYTHONUNBUFFERED too)
        unbuffered = bool(request["env"].get("PYTHONUNBUFFERED"))
        sys.stdin = sys.__stdin__ = open(os.devnull)
        sys.stdout = sys.__stdout__ = _stream(1, sys.__stdout__, unbuffered)
        sys.stderr = sys.__stderr__ = _stream(2, sys.__stderr__, unbuffered)
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
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            stream.flush()
    finally:
        os._exit(code)


def _stream(fd: int, like, unbuffered: bool):
    """A text stream on ``fd`` with the encoding and error handler Python chose for ``like``."""
    import io
    raw = open(fd, "wb", buffering=0 if unbuffered else -1, closefd=False)
    return io.TextIOWrapper(raw, encoding=getattr(like, "encoding", None) or "utf-8",
                            errors=getattr(like, "errors", None) or "strict",
                            line_buffering=fd == 2, write_through=unbuffered)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        _prepare()()
