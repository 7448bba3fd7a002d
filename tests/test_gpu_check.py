"""`scripts/gpu_check.sh`, the one GPU run issues #11 and #13 wait for, works before a GPU is lent: run here on the CPU
with tiny models and sizes cut down (instant on any machine, bf16 emulated or not: no step comes near its time
limit), every step runs and writes its files, and a step that fails is named and fails the run while the others
still run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
# Tiny models (and a 256^3 reference matmul): the plumbing is checked, not the speed.
SMALL_BENCHMARK = ("--model-size tiny --sections inference --batch-sizes 1 --repeats 1 --no-onnx --no-cpu-bf16 "
                   "--no-torch-ops --no-int8")
# --single_process: the layout the GPU run takes (one end-to-end process on the device), not the CPU's 1 x 2 / 2 x 1.
SMALL_ANNOTATION = "--model_size tiny --model_batches 1 --single_process --num_workers 1 --batch_size 4"

# No torchcodec marker: the GPU image lacks it, and the annotation benchmark decodes with the ffmpeg command there.
pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the annotation corpus is encoded with ffmpeg")


def run_check(tmp_path: Path, out: Path, benchmark_extra: str, annotation_extra: str) -> subprocess.CompletedProcess:
    wheels = tmp_path / "no-wheels"
    wheels.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "DEVICE": "cpu",
        "WHEELS": str(wheels),
        "CORPUS_DIR": str(tmp_path / "corpus"),
        "OUT": str(out),
        "ANNOTATION_HOURS": "0.005",
        "BENCHMARK_EXTRA": benchmark_extra,
        "ANNOTATION_EXTRA": annotation_extra,
    }
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def passing_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    tmp_path = tmp_path_factory.mktemp("gpu_check")
    out = tmp_path / "results"
    return run_check(tmp_path, out, SMALL_BENCHMARK, SMALL_ANNOTATION), out


def test_every_step_runs_and_writes_its_results(passing_run):
    result, out = passing_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[gpu_check] all steps passed" in result.stdout
    expected = {
        "environment.txt",
        "test_gpu.log",
        "benchmark_gpu_bf16.log",
        "benchmark_gpu_bf16.json",
        "benchmark_annotation_gpu.log",
        "benchmark_annotation_gpu.json",
    }
    assert {path.name for path in out.iterdir()} == expected
    environment = (out / "environment.txt").read_text()
    assert "torch " in environment and "no CUDA device" in environment
    assert "skipped" in (out / "test_gpu.log").read_text()  # tests/test_gpu.py ran, and skipped without CUDA
    benchmark = json.loads((out / "benchmark_gpu_bf16.json").read_text())
    assert benchmark["settings"]["device"] == "cpu" and benchmark["settings"]["bf16"] is True  # DEVICE, and --bf16
    assert benchmark["settings"]["batch_sizes"] == [1] and benchmark["training"] == []  # BENCHMARK_EXTRA's last values
    assert benchmark["settings"]["model_size"] == "tiny" and benchmark["settings"]["matmul_size"] == 256
    assert {row["model"] for row in benchmark["inference"]} >= {"htsat_hf", "ClapAudioModel", "AST"}
    assert all(row["clips_per_s"] > 0 for row in benchmark["inference"])
    annotation = json.loads((out / "benchmark_annotation_gpu.json").read_text())
    assert annotation["settings"]["device"] == "cpu" and annotation["settings"]["bf16"] is True
    assert annotation["settings"]["batch_size"] == 4 and annotation["settings"]["corpus_dir"].endswith("corpus")
    assert annotation["settings"]["model_size"] == "tiny" and annotation["settings"]["single_process"] is True
    assert annotation["settings"]["model_batches"] == 1
    assert annotation["files"] >= 1 and annotation["one_process_on_device"]["audio_hours_per_hour"] > 0


def test_a_failing_step_is_named_and_fails_the_run_while_the_others_run(tmp_path):
    out = tmp_path / "results"
    result = run_check(tmp_path, out, f"{SMALL_BENCHMARK} --no-such-flag", f"{SMALL_ANNOTATION} --batch_size many")
    assert result.returncode == 1
    assert "[gpu_check] failed: benchmark_gpu_bf16 (2) benchmark_annotation_gpu (2)" in result.stderr
    assert "test_gpu: exit status 0" in result.stdout  # the first step still ran and passed
    assert "unrecognized arguments: --no-such-flag" in (out / "benchmark_gpu_bf16.log").read_text()
    assert "invalid int value: 'many'" in (out / "benchmark_annotation_gpu.log").read_text()
