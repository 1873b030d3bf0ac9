#!/usr/bin/env bash
# The whole test suite, from a fresh machine: sets up .venv (with nnU-Net as the reference) and the environments
# that are macOS Slicer's Python (.venv-slicer: torch 2.2.2 with numpy 2.0.2 and with numpy 1.26), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh --test
# Without ../shared/data or a reference package the tests needing them would skip and the run pass: stop instead.
.venv/bin/python scripts/check_test_setup.py
scripts/setup-slicer-pythons.sh
exec .venv/bin/python -m pytest "$@"
