#!/usr/bin/env bash
# Installs jaxsae with its test extra into ./.venv and runs the whole suite.
# This is the README's test command and exactly what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch is a CPU-only test reference; pin it first so nothing pulls a CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"

# Single-device tests, then the multi-device ones in their own process: the fake device
# count must be set before JAX starts. The real-context rehearsal (tests/test_rehearsal.py) is run by
# hand: `python -m pytest -q -m real_context tests/test_rehearsal.py`.
python -m pytest -q -m "not multidevice and not real_context" "$@"
set +e
XLA_FLAGS="--xla_force_host_platform_device_count=8" python -m pytest -q -m multidevice "$@"
rc=$?
set -e
# 5 = nothing collected (no multi-device tests selected); anything else is a real result.
[ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || exit "$rc"
