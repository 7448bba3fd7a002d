"""End to end: 2-process CPU DDP training under `accelerate launch` on a small audiofolder, then the saved folder
loads into the audio-classification pipeline; resuming continues the run; averaging writes a loadable model."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import needs_torchcodec

# The training script decodes its audiofolder through datasets (torchcodec); 2-process DDP training is a true
# end-to-end run: `pytest -m slow` (CI's second step).
pytestmark = [needs_torchcodec, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = [
    "--embed_dim", "8", "--depths", "1", "1", "1", "1", "--num_heads", "1", "1", "1", "1",
    "--spec_size", "64", "--clip_seconds", "0.6", "--time_mask_width", "8",
]


def write_audiofolder(root: Path, per_class: int = 6) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 2)):
        for name, freq in (("low", 300.0), ("high", 3000.0), ("noise", None)):
            for i in range(count):
                rate = (16000, 22050, 32000)[i % 3]
                t = np.arange(int(rate * rng.uniform(0.3, 1.2))) / rate
                x = rng.standard_normal(t.size) * 0.2 if freq is None else 0.3 * np.sin(2 * np.pi * freq * t)
                (root / split / name).mkdir(parents=True, exist_ok=True)
                sf.write(root / split / name / f"{i}.wav", x.astype(np.float32), rate)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def training_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def two_process_train_command() -> list[str]:
    """`accelerate launch -m htsat_hf.commands.train` as 2 CPU processes (real DDP, see training_env); skips without the CLI."""
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate CLI not installed next to the interpreter")
    return [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "htsat_hf.commands.train",
    ]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    command = two_process_train_command()
    tmp = tmp_path_factory.mktemp("ddp")
    write_audiofolder(tmp / "data")
    out = tmp / "out"
    command += [
        "--dataset_name", str(tmp / "data"), "--eval_split_name", "test", "--output_dir", str(out),
        *TINY_MODEL, "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
        "--num_train_epochs", "2", "--save_strategy", "epoch", "--logging_steps", "1", "--use_cpu",
        "--ddp_find_unused_parameters", "False", "--report_to", "none", "--seed", "0", "--disable_tqdm", "True",
    ]
    result = subprocess.run(command, env=training_env(), capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return tmp, out, command, result


def test_ddp_training_writes_a_complete_model_folder(ddp_run):
    _, out, _, result = ddp_run
    log = result.stdout + result.stderr
    assert "Process rank 0 of 2" in log  # really two processes (world size 2)
    assert (out / "model.safetensors").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "high", "1": "low", "2": "noise"}
    assert config["problem_type"] == "single_label_classification" and config["embed_dim"] == 8
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["max_length_seconds"] == 0.6 and preprocessor["sampling_rate"] == 32000
    results = json.loads((out / "all_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and results["eval_num_skipped_examples"] == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6  # 18 clips / (2 ranks x 4) = 3 steps per epoch, 2 epochs
    rates = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    assert rates[:3] == pytest.approx([2e-5] * 3) and rates[3:6] == pytest.approx([5e-5] * 3)  # original warm-up


def test_saved_folder_runs_in_the_pipeline(ddp_run):
    from transformers import pipeline

    import htsat_hf  # noqa: F401

    tmp, out, _, _ = ddp_run
    classifier = pipeline("audio-classification", model=str(out))
    predictions = classifier(str(tmp / "data" / "test" / "low" / "0.wav"))
    assert {p["label"] for p in predictions} == {"high", "low", "noise"}
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-4)


def test_resume_continues_the_same_run(ddp_run):
    tmp, out, command, _ = ddp_run
    resumed = tmp / "resumed"
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    again = list(command)
    again[again.index("--output_dir") + 1] = str(resumed)
    again[again.index("--main_process_port") + 1] = str(free_port())
    again += ["--resume_from_checkpoint", str(resumed / "checkpoint-3")]
    result = subprocess.run(again, env=training_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps[:3] == [1, 2, 3] and steps[-1] == 6  # history carried over from the checkpoint


def test_average_checkpoints_of_the_run(ddp_run, tmp_path):
    from transformers import AutoModelForAudioClassification

    import htsat_hf  # noqa: F401
    from htsat_hf.training.averaging import average_checkpoints, load_state_dict_from

    _, out, _, _ = ddp_run
    averaged = average_checkpoints([out / "checkpoint-3", out / "checkpoint-6"], tmp_path / "avg")
    model = AutoModelForAudioClassification.from_pretrained(averaged)
    a, b = load_state_dict_from(out / "checkpoint-3"), load_state_dict_from(out / "checkpoint-6")
    key = next(k for k, v in a.items() if v.is_floating_point() and not np.allclose(v, b[k]))
    np.testing.assert_allclose(model.state_dict()[key].numpy(), ((a[key] + b[key]) / 2).numpy(), atol=1e-6)
    assert (averaged / "preprocessor_config.json").exists()
