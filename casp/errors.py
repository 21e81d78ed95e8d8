"""User-facing errors: each carries one line that names the problem and the fix.

The CLI prints ``error: <message>`` for these and exits non-zero, without a traceback.
"""


class CaspError(Exception):
    """Base of every error that casp reports to the user in one line."""


class ModelLoadError(CaspError):
    """A model directory is missing, incomplete, or of an unsupported architecture."""


class CalibrationDataError(CaspError):
    """Calibration data is missing, empty or unusable."""


class CheckpointError(CaspError):
    """A compressed checkpoint is corrupt, truncated or does not match its config."""
