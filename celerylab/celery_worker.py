"""``celery``, exactly as its own command runs, minus the command-line extras a worker never uses.

Celery's command imports every ``celery.commands`` entry point when it starts (Flower, installed
for chapter 7, registers one) and the interactive shell of ``celery amqp`` (``click_repl``, which
loads prompt_toolkit). Together they cost about 0.4 s of CPU per worker boot on the reference
machine, a third of a boot, and chapter 6 alone boots 26 workers. The course's workers run
``celery ... worker`` only, so this launcher leaves both out, then calls Celery's own ``main()``:
the same options, bootsteps and process tree as ``celery`` itself. ``Worker.command`` shows the
command a learner would type.
"""

import importlib.metadata as metadata
import sys
import types

_entry_points = metadata.entry_points


def _without_cli_plugins(*args, **kwargs):
    if kwargs.get("group") == "celery.commands":
        return metadata.EntryPoints(())
    return _entry_points(*args, **kwargs)


if __name__ == "__main__":
    metadata.entry_points = _without_cli_plugins  # read once, when celery.bin.celery is imported
    repl = types.ModuleType("click_repl")  # `celery amqp`'s interactive shell: not for a worker
    repl.register_repl = lambda group, name="repl": None
    sys.modules.setdefault("click_repl", repl)
    from celery.__main__ import main

    main()
