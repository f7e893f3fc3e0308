"""Lab checkers, one module per lab (``celerylab/checks/labNN.py``), shared parts in ``common``.

Each runs the learner's code against the live stack and prints what passed, or raises
``LabCheckFailed`` with a hint that names the symptom without giving the answer away.
"""

from celerylab.checks.common import LabCheckFailed, MachineTooBusy
from celerylab.checks.hints import hint, hint_button
from celerylab.checks.lab01 import check_lab01
from celerylab.checks.lab02 import check_lab02, run_lab02_workload
from celerylab.checks.lab03 import check_lab03
from celerylab.checks.lab04 import check_lab04
from celerylab.checks.lab05 import check_lab05
from celerylab.checks.lab06 import check_lab06
from celerylab.checks.lab07 import check_lab07
from celerylab.checks.lab08 import (
                                    check_lab08,
                                    check_lab08_contracts,
                                    check_lab08_note,
                                    check_lab08_observability,
                                    check_lab08_tests,
)
from celerylab.checks.lab09 import check_lab09
from celerylab.checks.lab10 import check_lab10

__all__ = ["LabCheckFailed", "MachineTooBusy", "check_lab01", "check_lab02", "check_lab03",
           "check_lab04", "check_lab05", "check_lab06", "check_lab07", "check_lab08",
           "check_lab08_contracts", "check_lab08_note", "check_lab08_observability",
           "check_lab08_tests", "check_lab09", "check_lab10", "hint", "hint_button", "run_lab02_workload"]
