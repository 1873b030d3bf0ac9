#!/usr/bin/env bash
# The whole test suite, from a fresh machine: sets up .venv (with nnU-Net as the reference) and the environments
# that are macOS Slicer's Python (.venv-slicer: torch 2.2.2 with numpy 2.0.2 and with numpy 1.26), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh --test
# Without ../shared/data or a reference package the tests needing them would skip and the run pass: stop instead.
.venv/bin/python scripts/check_test_setup.py
# The reference models (nnU-Net's own planning and training, minutes in all) are built ahead, into the folder the
# tests read, at the lowest priority: on the core the tests leave idle, never slowing a test that measures time. A
# test whose model is not built yet waits for it or builds it itself (Testing/build_lock.py).
# SEGMENTMBTFE_BUILD_AHEAD=0 leaves them all to the tests.
export SEGMENTMBTFE_REFERENCE_CACHE="${SEGMENTMBTFE_REFERENCE_CACHE:-$PWD/.reference-cache}"
mkdir -p "$SEGMENTMBTFE_REFERENCE_CACHE"
if [ "${SEGMENTMBTFE_BUILD_AHEAD:-1}" != 0 ]; then
    nice -n 19 .venv/bin/python Testing/build_references.py "$SEGMENTMBTFE_REFERENCE_CACHE" \
        > "$SEGMENTMBTFE_REFERENCE_CACHE/build_ahead.log" 2>&1 &
    builder=$!
    # it leads a process group of its own (build_references.py): ended with the nnU-Net processes it started
    trap 'kill -- -"$builder" 2>/dev/null || kill "$builder" 2>/dev/null || true' EXIT
fi
scripts/setup-slicer-pythons.sh
status=0
.venv/bin/python -m pytest "$@" || status=$?
exit "$status"
