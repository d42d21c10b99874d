"""The one base class of user errors: what every command-line tool reports as one line and exit status 2.

A user error is one the user can fix (a config key, a file, a busy run directory, a diverged run) and
whose message names the fix. Each module keeps its own error class (ConfigError, StoreError,
CheckpointError, TrainingError, RunDirBusy, ...) and derives it from `UserError` as well, so a CLI
catches exactly these and lets a bug show its traceback. This module imports nothing, so a CLI can
catch user errors without loading JAX first.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; the message names the culprit and the fix."""
