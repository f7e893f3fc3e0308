"""celerylab: the support package of the course (broker, workers, recording, plots, checkers).

``celerylab.start`` and friends are imported on first use, so that the course's small helper
processes (``python -m celerylab.watchdog``, the worker launcher) do not import celery and redis
just to start (0.57 s of CPU each, and the suite starts hundreds)."""

__all__ = ["CourseError", "Stack", "current", "start"]


def __getattr__(name):
    if name == "CourseError":
        from celerylab.errors import CourseError
        return CourseError
    if name in ("Stack", "current", "start"):
        from celerylab import stack
        return getattr(stack, name)
    raise AttributeError(f"module 'celerylab' has no attribute {name!r}")
