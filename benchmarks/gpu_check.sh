#!/usr/bin/env bash
# The GPU path proven on a real GPU, in one run of under 8 minutes (never a CI step: CI has no GPU).
#
#   bash benchmarks/gpu_check.sh prepare     # here, once: makes .gpu_carry/ (packages, real data, the CT model)
#   bash benchmarks/gpu_check.sh             # on the device machine, with .gpu_carry carried (see the README)
#   bash benchmarks/gpu_check.sh dry-run     # here: every step on the CPU, small, to check the script
#
# The device machine has no network and its own python3 (torch with CUDA, numpy, scipy; KINDS.md): what it
# lacks (SimpleITK, nnunetv2 and what nnunetv2 imports) travels in .gpu_carry/site.tar.xz, unpacked to
# /tmp/site; the engine is this working tree's. benchmarks/gpu_check.py says what is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
CARRY=${GPU_CHECK_CARRY:-$REPO/.gpu_carry}
BUDGET_S=${GPU_CHECK_BUDGET_S:-400}   # the Python steps; unpacking and start-up come on top (under 8 minutes in all)

case "${1:-run}" in
  prepare)
    grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >> .git/info/exclude
    exec .venv/bin/python benchmarks/gpu_check.py --prepare --carry "$CARRY"
    ;;
  dry-run)
    exec .venv/bin/python benchmarks/gpu_check.py --cpu-dry-run --carry "$CARRY" --budget-s "$BUDGET_S"
    ;;
  run)
    [ -f "$CARRY/site.tar.xz" ] || { echo "no $CARRY/site.tar.xz: run 'bash benchmarks/gpu_check.sh prepare' here and carry .gpu_carry" >&2; exit 2; }
    started=$(date +%s)
    mkdir -p /tmp/site
    tar -xJf "$CARRY/site.tar.xz" -C /tmp/site
    export PYTHONPATH="/tmp/site:$REPO/SegmentMBTFE${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 nnUNet_raw=/tmp/nnunet_raw nnUNet_preprocessed=/tmp/nnunet_pre nnUNet_results=/tmp/nnunet_results
    export SEGMENTMBTFE_HOME=/tmp/segmentmbtfe_home
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    echo "unpacked in $(( $(date +%s) - started )) s"
    timeout $(( BUDGET_S + 60 )) python3 benchmarks/gpu_check.py --carry "$CARRY" --budget-s "$BUDGET_S"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_check.sh [prepare|dry-run]" >&2
    exit 2
    ;;
esac
