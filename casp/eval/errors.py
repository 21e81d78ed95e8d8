"""The one error class of the evaluation harness.

Every problem with the user's input (a missing file, an empty task file, a results file of another
schema version, a model that cannot run a task) raises :class:`EvalError` with a one-line message
that names the file (and line) and the fix. The CLI prints the message and exits non-zero; no deep
torch traceback reaches the user.
"""

from __future__ import annotations

from casp.errors import CaspError


class EvalError(CaspError):
    """Bad evaluation input: the message is one line, names the file/line and how to fix it."""
