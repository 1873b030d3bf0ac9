#!/usr/bin/env bash
# End to end on a fresh machine: set up .venv, then segment a real MR DICOM series with a model folder.
#   scripts/demo.sh [MODEL_FOLDER]     (default: the shipped default model, models/hippocampus_mbtfe)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh
MODEL=${1:-models/hippocampus_mbtfe}
.venv/bin/segment-mbtfe models info "$MODEL"
.venv/bin/segment-mbtfe predict -m "$MODEL" -i ../shared/data/hippocampus/dicom/11_HCropVolume \
    -o demo/11_HCropVolume.seg.nrrd
