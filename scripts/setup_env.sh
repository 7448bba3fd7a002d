#!/usr/bin/env bash
# Creates .venv with everything htsat-hf needs (idempotent; quick when already set up).
# System packages: ffmpeg (audio decoding for datasets/torchcodec and the pipelines),
# espeak-ng (the offline demo dataset). Installed with apt-get when missing and we are root.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v ffmpeg >/dev/null 2>&1 || need_apt+=(ffmpeg)
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing system packages: ${need_apt[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "[setup] please install: ${need_apt[*]} (e.g. sudo apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.htsat-hf-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  echo "[setup] installing htsat-hf and its dependencies into .venv (first time: ~2 minutes)"
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.14.1" "torchaudio==2.11.0" 2>&1 | grep -v "is ignored" || true
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import torch, torchaudio, transformers, datasets, htsat_hf" 
  test -x .venv/bin/htsat-hf  # the installed command (setup.cfg's console_scripts) README's first command runs
  touch "$stamp"
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")')"
