"""celerylab: the support package of the course (broker, workers, recording, plots, checkers)."""

from celerylab.errors import CourseError
from celerylab.stack import Stack, current, start

__all__ = ["CourseError", "Stack", "current", "start"]
