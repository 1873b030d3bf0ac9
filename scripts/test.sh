#!/usr/bin/env bash
# The whole test suite, from a fresh machine: sets up .venv (with nnU-Net as the reference), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh --test
exec .venv/bin/python -m pytest "$@"
