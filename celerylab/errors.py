"""Errors that explain themselves: what is wrong and how to fix it, without a stack trace."""

from __future__ import annotations


class CourseError(RuntimeError):
    """An error whose message is the whole story.

    IPython calls ``_render_traceback_`` instead of printing a traceback, so a learner sees only
    the message: what went wrong and what to do about it.
    """

    def _render_traceback_(self) -> list[str]:
        title = type(self).__name__
        return [f"\x1b[1;31m{title}\x1b[0m: {line}" if i == 0 else line
                for i, line in enumerate(str(self).splitlines() or [""])]
