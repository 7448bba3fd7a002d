#!/usr/bin/env bash
# The GPU measurements issues #11 and #13 wait for, as one short run on a machine with an NVIDIA GPU (a few minutes):
#   1. tests/test_gpu.py: fp32, bf16 autocast and the log-mel on the GPU against the CPU;
#   2. htsat-hf benchmark model --device cuda --bf16: clips/s at batch 1/16/128 against ClapAudioModel and AST, and a
#      training step at batch 32 (samples/s, peak memory) against AST;
#   3. htsat-hf benchmark annotation --device cuda --bf16: hours of audio per GPU-hour end to end against the
#      model alone, with the features on the GPU and 8 decoding workers, and how busy the GPU was.
# Each step has its own time limit (120 + 210 + 210 s, inside a 10-minute call), so one that hangs cannot take the
# others' time. Results go to $OUT (default
# results/gpu): environment.txt and, per step, its log, and the benchmarks' JSON (6 files). Wheels in .whl/
# (scripts/device_wheels.sh) are installed first, for images that lack some of the project's dependencies.
# It exits 1 if any step failed (all steps still run). tests/test_gpu_check.py runs it on the CPU with tiny models and
# the sizes cut down, so that it checks the plumbing in seconds on any CPU (bf16 emulated or not):
#   DEVICE=cpu BENCHMARK_EXTRA="--model-size tiny --batch-sizes 1 ..." ANNOTATION_EXTRA="--model_size tiny ..." \
#     bash scripts/gpu_check.sh
# (DEVICE: the benchmarks' --device, default cuda; WHEELS: the wheel folder, default .whl; CORPUS_DIR: where the
# annotation corpus is generated, default /tmp/htsat-corpus; *_EXTRA: arguments appended to a step's command, where the last
# value of a flag wins.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
WHEELS=${WHEELS:-.whl}
CORPUS_DIR=${CORPUS_DIR:-/tmp/htsat-corpus}
read -r -a BENCHMARK_EXTRA <<< "${BENCHMARK_EXTRA:-}"
read -r -a ANNOTATION_EXTRA <<< "${ANNOTATION_EXTRA:-}"
SITE=/tmp/htsat-site
mkdir -p "$OUT"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl || { echo "[gpu_check] installing $WHEELS/ failed" >&2; exit 1; }
  export PYTHONPATH="$SITE"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if ! command -v ffmpeg >/dev/null; then  # imageio-ffmpeg's static build, where the image has none
  binary=$(ls "$SITE"/imageio_ffmpeg/binaries/ffmpeg-* 2>/dev/null | head -1)
  if [ -n "$binary" ]; then
    mkdir -p /tmp/htsat-bin && ln -sf "$binary" /tmp/htsat-bin/ffmpeg && export PATH="/tmp/htsat-bin:$PATH"
  fi
fi
{
  date -u; nvidia-smi || echo "nvidia-smi: not available"; echo "ffmpeg: $(command -v ffmpeg || echo none)"
  "$PY" -c "import torch, transformers, accelerate, numpy, pyarrow; print('torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| numpy', numpy.__version__, '| pyarrow', pyarrow.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

step() {  # step NAME SECONDS COMMAND...: runs it under its limit, its output in $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "[gpu_check] $name (limit ${limit} s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local status=${PIPESTATUS[0]}
  echo "[gpu_check] $name: exit status $status"
  [ "$status" -eq 0 ] || failed+=("$name ($status)")
  return 0
}
failed=()
step test_gpu "${TEST_LIMIT:-120}" "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
step benchmark_gpu_bf16 "${BENCHMARK_LIMIT:-210}" "$PY" -m htsat_hf benchmark model --device "$DEVICE" --bf16 \
  --sections inference training --output "$OUT/benchmark_gpu_bf16.json" "${BENCHMARK_EXTRA[@]}"
step benchmark_annotation_gpu "${ANNOTATION_LIMIT:-210}" "$PY" -m htsat_hf benchmark annotation --device "$DEVICE" --bf16 \
  --hours "${ANNOTATION_HOURS:-0.5}" --num_workers 8 --batch_size 128 --corpus_dir "$CORPUS_DIR" \
  --output "$OUT/benchmark_annotation_gpu.json" "${ANNOTATION_EXTRA[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "[gpu_check] failed: ${failed[*]}" >&2
  exit 1
fi
echo "[gpu_check] all steps passed; results in $OUT"
