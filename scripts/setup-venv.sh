#!/usr/bin/env bash
# Creates (or completes) the virtual environment at .venv with the engine and its `segment-mbtfe` command.
#   scripts/setup-venv.sh          runtime only: torch, numpy, scipy, SimpleITK
#   scripts/setup-venv.sh --test   also the test tools, nnU-Net (the reference) and the Slicer core
# torch is installed only when the venv has none (TORCH_SPEC, default torch==2.13.0); afterwards every
# install runs under a constraint pinning the torch that is there, so nothing can replace it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --quiet --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "Installing ${TORCH_SPEC:=torch==2.13.0} into .venv ..."
    "${pip[@]}" install "$TORCH_SPEC"
fi
mkdir -p .venv/constraints
.venv/bin/python -W ignore -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null > .venv/constraints/torch.txt

if [ "${1:-}" = "--test" ]; then
    "${pip[@]}" install -c .venv/constraints/torch.txt -e ".[test]" -r Testing/requirements.txt
    # nnU-Net v1, the reference of Testing/test_nnunet_v1.py: without its setup.py's dependencies (it names the
    # deprecated `sklearn` package); what its import path needs comes with nnunetv2 and Testing/requirements.txt
    "${pip[@]}" install -c .venv/constraints/torch.txt --no-deps "nnunet==1.7.1"
else
    "${pip[@]}" install -c .venv/constraints/torch.txt -e .
fi
