#!/usr/bin/env bash
# The whole test suite, from a fresh machine: sets up .venv (with nnU-Net as the reference) and the environments
# that are macOS Slicer's Python (.venv-slicer: torch 2.2.2 with numpy 2.0.2 and with numpy 1.26), then pytest.
# Arguments go to pytest; naming tests (a path, a node id, -k EXPRESSION) runs those in one session.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh --test
# Without ../shared/data or a reference package the tests needing them would skip and the run pass: stop instead.
.venv/bin/python scripts/check_test_setup.py
# The reference models (nnU-Net's own planning and training, minutes in all) are built ahead, on a core the tests
# leave idle, into the folder the tests read; a test whose model is not built yet waits for it or builds it
# itself (Testing/build_lock.py). SEGMENTMBTFE_BUILD_AHEAD=0 leaves them all to the tests.
export SEGMENTMBTFE_REFERENCE_CACHE="${SEGMENTMBTFE_REFERENCE_CACHE:-$PWD/.reference-cache}"
mkdir -p "$SEGMENTMBTFE_REFERENCE_CACHE"
pids=()
trap 'for pid in "${pids[@]}"; do kill -- -"$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true; done' EXIT
if [ "${SEGMENTMBTFE_BUILD_AHEAD:-1}" != 0 ]; then
    .venv/bin/python Testing/build_references.py "$SEGMENTMBTFE_REFERENCE_CACHE" \
        > "$SEGMENTMBTFE_REFERENCE_CACHE/build_ahead.log" 2>&1 &
    pids+=($!)  # it leads a process group of its own (build_references.py), ended with the processes it started
fi
for argument in "$@"; do
    if [ "${argument#-}" = "$argument" ]; then  # tests named: one session
        scripts/setup-slicer-pythons.sh
        status=0
        .venv/bin/python -m pytest "$@" || status=$?
        exit "$status"
    fi
done
# The whole suite, in two sessions side by side (the machine has two cores and one session keeps about one busy):
# the Slicer module's suites, with the environments that are macOS Slicer's Python made first, and the rest. Each
# session ends with the check that only the tests Testing/known_skips.py names skipped.
SLICER_PART=(Testing/slicer Testing/test_slicer_pythons.py Testing/test_torch_22_paths.py)
SKIP_CHECK=Testing/test_known_skips.py::test_only_the_known_tests_skip
slicer_log="$SEGMENTMBTFE_REFERENCE_CACHE/slicer_part.log"
(scripts/setup-slicer-pythons.sh && .venv/bin/python -m pytest -p no:cacheprovider "$@" "${SLICER_PART[@]}" \
    "$SKIP_CHECK") > "$slicer_log" 2>&1 &
slicer_part=$!
status=0
.venv/bin/python -m pytest "$@" "${SLICER_PART[@]/#/--ignore=}" || status=$?
slicer_status=0
wait "$slicer_part" || slicer_status=$?
echo "======================== the Slicer part of the suite (run beside the rest) ========================"
cat "$slicer_log"
[ "$status" = 0 ] && [ "$slicer_status" = 0 ]
