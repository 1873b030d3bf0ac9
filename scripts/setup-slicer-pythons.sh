#!/usr/bin/env bash
# Virtual environments that are macOS Slicer's Python as far as Linux can be (Testing/test_slicer_pythons.py):
#   .venv-slicer/5.10-macos   Python 3.12, numpy 2.0.2, torch 2.2.2   (Slicer 5.10 on macOS)
#   .venv-slicer/5.8-macos    Python 3.9,  numpy 1.26.4, torch 2.2.2  (Slicer 5.6 / 5.8 on macOS)
# Slicer's macOS builds are x86_64 (Rosetta), where 2.2.2 is the newest torch. PyPI's Linux torch 2.2.2 is the
# CUDA build: its libraries load libcudart, cuBLAS, cuDNN, ... at import even on the CPU, so its NVIDIA packages
# come along (about 2.7 GB, kept in pip's cache); triton, which only torch.compile uses, is left out.
# Each environment gets the engine's runtime packages with numpy pinned, as the module installs them in Slicer.
set -euo pipefail
cd "$(dirname "$0")/.."

# torch 2.2.2's own requirements on Linux, less triton (torch.compile only)
TORCH_222_REQUIRES=(filelock typing-extensions sympy networkx jinja2 fsspec
    nvidia-cuda-nvrtc-cu12==12.1.105 nvidia-cuda-runtime-cu12==12.1.105 nvidia-cuda-cupti-cu12==12.1.105
    nvidia-cudnn-cu12==8.9.2.26 nvidia-cublas-cu12==12.1.3.1 nvidia-cufft-cu12==11.0.2.54
    nvidia-curand-cu12==10.3.2.106 nvidia-cusolver-cu12==11.4.5.107 nvidia-cusparse-cu12==12.1.0.106
    nvidia-nccl-cu12==2.19.3 nvidia-nvtx-cu12==12.1.105)

find_python() {  # 3.12 -> an interpreter of that version: on PATH, else one that pyenv installed
    local candidate
    for candidate in "python$1" "$(pyenv root 2>/dev/null)"/versions/"$1".*/bin/python"$1"; do
        if "$candidate" -c "" 2>/dev/null; then command -v "$candidate"; return; fi
    done
    echo "setup-slicer-pythons: Python $1 (Slicer's Python) is needed and is not on this machine" >&2
    exit 1
}

make_env() {  # folder python-version numpy
    local folder=$1 python numpy=$3
    python=$(find_python "$2")
    [ -x "$folder/bin/python" ] || "$python" -m venv "$folder"
    local pip=("$folder/bin/python" -m pip --quiet --disable-pip-version-check)
    if [ "$("$folder/bin/python" -c 'import torch, numpy; print(torch.__version__.split("+")[0], numpy.__version__)' 2>/dev/null)" \
         != "2.2.2 $numpy" ]; then
        echo "Installing torch 2.2.2 and numpy $numpy into $folder ..."
        "${pip[@]}" install --no-deps torch==2.2.2
        "${pip[@]}" install "numpy==$numpy" "${TORCH_222_REQUIRES[@]}"
    fi
    # the engine's other runtime packages, numpy held where Slicer has it
    echo "numpy==$numpy" > "$folder/numpy-pin.txt"
    "${pip[@]}" install -c "$folder/numpy-pin.txt" "scipy>=1.8" "SimpleITK>=2.2"
    "$folder/bin/python" -W ignore -c "import torch, numpy, scipy, SimpleITK" 2>/dev/null || {
        echo "setup-slicer-pythons: $folder does not import torch, numpy, scipy and SimpleITK" >&2; exit 1; }
}

mkdir -p .venv-slicer
make_env .venv-slicer/5.10-macos 3.12 2.0.2
make_env .venv-slicer/5.8-macos 3.9 1.26.4
