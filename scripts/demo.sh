#!/usr/bin/env bash
# End to end on a fresh machine: set up .venv, get a model folder, segment a real MR DICOM series.
#   scripts/demo.sh [MODEL_FOLDER]
# Without MODEL_FOLDER, a small hippocampus model is made with nnU-Net's own planner and trainer
# (a few minutes on 2 CPU cores, briefly trained) until trained models ship in models/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh --test
DATA=../shared/data/hippocampus/dicom/11_HCropVolume
MODEL=${1:-}
if [ -z "$MODEL" ]; then
    MODEL=$(.venv/bin/python -c "
import sys; sys.path.insert(0, 'Testing')
from nnunet_reference import make_model_folder
print(make_model_folder('.cache/demo', kind='hippo3d', train_iterations=50))")
fi
.venv/bin/segment-mbtfe models info "$MODEL"
.venv/bin/segment-mbtfe predict -m "$MODEL" -i "$DATA" -o demo/11_HCropVolume.seg.nrrd
