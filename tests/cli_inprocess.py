"""Runs many `python -m jaxsae.<tool> ARGS` commands in this one process, each as its module's
`main(ARGS)`, so that a table of bad inputs pays for Python, JAX and jaxsae's imports once.

    python tests/cli_inprocess.py CASES.json RESULTS.json

CASES.json: [[argv, ...], ...] with argv = [python, "-m", "jaxsae.<tool>", *args]. Each command's
exit status (main's return value, or SystemExit's code) and everything written to file descriptor 2
while it ran (Python's sys.stderr and anything else: warnings, logging, progress bars) go to
RESULTS.json as [[returncode, stderr], ...]. An uncaught exception is printed as the traceback a real
process would show, with status 1.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import traceback


def run_one(argv: list[str]) -> tuple[int, str]:
    assert argv[1] == "-m", argv
    module, args = argv[2], argv[3:]
    with tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            try:
                rc = importlib.import_module(f"{module}.__main__").main(args)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # noqa: BLE001 - a bug: shown as a real process would show it
                traceback.print_exc()
                rc = 1
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        return int(rc or 0), err.read().decode("utf-8", "replace")


if __name__ == "__main__":
    cases = json.loads(open(sys.argv[1]).read())
    results = [run_one(argv) for argv in cases]
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
