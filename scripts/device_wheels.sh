#!/usr/bin/env bash
# Downloads into .whl/ the wheels that a bare GPU image (Python 3.12 with PyTorch, transformers 5.17, accelerate,
# numpy, pandas, pyarrow, scipy, pytest; no internet) lacks for scripts/gpu_check.sh: transformers at the version
# tested here, soundfile with cffi, datasets and evaluate with the two dependencies such an image lacks, and
# imageio-ffmpeg for its static ffmpeg command (the image has no FFmpeg). About 45 MB; .whl/ is git-ignored, so carry it explicitly.
#   bash scripts/device_wheels.sh && bash scripts/gpu_check.sh   # the second on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(
  transformers==5.24.0 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12  # soundfile loads libsndfile through cffi
  datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19
  imageio-ffmpeg==0.6.0  # ffmpeg 7.0.2, static (0.8 is 68 MB)
)
mkdir -p .whl
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "${DEVICE_PYTHON:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${WHEELS[@]}" 2>&1 | grep -v "is ignored" || true
count=$(ls .whl/*.whl 2>/dev/null | wc -l)
[ "$count" -ge "${#WHEELS[@]}" ] || { echo "[device_wheels] expected ${#WHEELS[@]} wheels in .whl/, found $count" >&2; exit 1; }
echo "[device_wheels] $count wheels, $(du -sh .whl | cut -f1) in .whl/"
