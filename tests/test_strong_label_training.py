"""Training sound event detection from DESED-style strong-label TSVs: targets that follow the crop and the repeat
padding, frame targets through the collator's mixup, the `htsat-hf train` driver end to end (one process and
two-process DDP), and clear errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import needs_torchcodec
from test_training_end_to_end import training_env, two_process_train_command

from htsat_hf import HTSATConfig, HTSATFeatureExtractor, HTSATForSoundEventDetection
from htsat_hf.training.data import BadExampleError
from htsat_hf.training.labels import LabelSpace
from htsat_hf.training.mixup import HTSATDataCollator
from htsat_hf.training.strong_labels import (
    StepGrid,
    StrongLabelTransform,
    load_strong_labels,
    read_strong_labels,
    repeat_events,
    window_step_targets,
)

RATE = 32000
TONES = {"Dog": 700.0, "Speech": 3000.0}
LABELS = LabelSpace(["Dog", "Speech"], multi_label=True)
# 3 stages on a 128 x 128 image of 2-s windows: 16 token-semantic steps of 0.125 s per window
TINY_SED = [
    "--embed_dim", "8", "--depths", "1", "1", "1", "--num_heads", "1", "1", "1",
    "--spec_size", "128", "--clip_seconds", "2.0", "--time_mask_width", "8",
]


def tiny_config() -> HTSATConfig:
    return HTSATConfig(embed_dim=8, depths=[1, 1, 1], num_heads=[1, 1, 1], spec_size=128, clip_seconds=2.0,
                       long_input_hop_seconds=1.0, num_labels=2, id2label={0: "Dog", 1: "Speech"},
                       label2id={"Dog": 0, "Speech": 1})


def write_clip(path: Path, seconds: float, events: list[tuple[str, float, float]], rate: int = RATE,
               seed: int = 0) -> None:
    """Quiet noise with a loud tone per event (Dog 700 Hz, Speech 3 kHz) from its onset to its offset."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    x = 0.01 * rng.standard_normal(t.size)
    for label, onset, offset in events:
        inside = (t >= onset) & (t < offset)
        x[inside] += 0.5 * np.sin(2 * np.pi * TONES[label] * t[inside])
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), rate)


def write_tsv(path: Path, clips: dict[str, list[tuple[str, float, float]]], extra_column: bool = True) -> Path:
    header = "filename\tonset\toffset\tevent_label" + ("\tconfidence" if extra_column else "")
    lines = [header]
    for name, events in clips.items():
        if not events:
            lines.append(f"{name}\t\t\t" + ("\t" if extra_column else ""))
        for label, onset, offset in events:
            lines.append(f"{name}\t{onset}\t{offset}\t{label}" + ("\t1.0" if extra_column else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


def step_tone_energy(features: torch.Tensor, freq: float, fe: HTSATFeatureExtractor, num_steps: int) -> np.ndarray:
    """Per token-semantic step: mean log-mel energy in the mel bin of `freq` over the frames inside the step."""
    filters = fe.mel_filters().numpy()  # (freqs, mel)
    energy = features[:, int(filters[int(round(freq * fe.n_fft / fe.sampling_rate))].argmax())].numpy()
    frames = len(energy)
    step_of_frame = np.minimum(np.arange(frames) * num_steps // (frames - 1), num_steps - 1)
    return np.array([energy[step_of_frame == step].mean() for step in range(num_steps)])


# --------------------------------------------------------------------------------------------------- targets
def test_step_grid_is_the_models_grid():
    config = tiny_config()
    model = HTSATForSoundEventDetection(config)
    grid = StepGrid.from_config(config)
    assert grid.num_steps == config.token_steps == 16
    for frames in (201, 150, 256):
        assert grid.step_seconds(frames) == pytest.approx(model.frame_step_seconds(frames))
    with pytest.raises(ValueError, match="do not fit one 256-frame model image"):
        grid.step_seconds(257)


def test_crop_offset_moves_the_targets():
    events = [{"label": "Dog", "onset": 3.0, "offset": 4.0}]
    label2id = LABELS.label2id
    # a 2-s window starting 2.5 s into a 6-s clip: the event is at 0.5-1.5 s of the window
    targets = window_step_targets(events, 2.5, 2.0, 2.0, 16, 0.125, label2id)
    assert np.flatnonzero(targets[:, 0]).tolist() == list(range(4, 12)) and targets[:, 1].sum() == 0
    # a crop starting 3.5 s in sees only the second half, a crop starting at 0 none of it
    assert np.flatnonzero(window_step_targets(events, 3.5, 2.0, 2.0, 16, 0.125, label2id)[:, 0]).tolist() == [0, 1, 2, 3]
    assert window_step_targets(events, 0.0, 2.0, 2.0, 16, 0.125, label2id).sum() == 0
    # a boundary inside a step gives a soft target
    soft = window_step_targets(events, 2.5625, 2.0, 2.0, 16, 0.125, label2id)[:, 0]
    assert soft[3] == pytest.approx(0.5) and soft[11] == pytest.approx(0.5) and soft[4:11].min() == 1.0


def test_short_clips_repeat_their_events_like_their_audio():
    repeated = repeat_events([{"label": "Dog", "onset": 0.25, "offset": 0.5}, {"label": "Speech", "onset": 0.5,
                                                                                  "offset": 0.9}], 0.75, 2.0)
    spans = sorted((e["label"], round(e["onset"], 6), round(e["offset"], 6)) for e in repeated)
    assert spans == [("Dog", 0.25, 0.5), ("Dog", 1.0, 1.25), ("Dog", 1.75, 2.0),  # the third copy cut at 2 s
                     ("Speech", 0.5, 0.75), ("Speech", 1.25, 1.5)]  # offset past the clip's end cut to it
    targets = window_step_targets([{"label": "Dog", "onset": 0.25, "offset": 0.5}], 0.0, 0.75, 2.0, 16, 0.125,
                                  LABELS.label2id)
    assert np.flatnonzero(targets[:, 0]).tolist() == [2, 3, 8, 9, 14, 15]


@needs_torchcodec
def test_transform_targets_follow_the_random_crop_and_the_padding(tmp_path):
    fe = HTSATFeatureExtractor(max_length_seconds=2.0)
    grid = StepGrid.from_config(tiny_config())
    write_clip(tmp_path / "long.wav", 6.0, [("Dog", 3.0, 4.0), ("Speech", 0.4, 1.0)])
    write_clip(tmp_path / "short.wav", 0.75, [("Dog", 0.25, 0.5)], rate=16000)  # resampled, then repeated
    batch = {
        "audio": [{"path": str(tmp_path / "long.wav"), "bytes": None}, {"path": str(tmp_path / "short.wav"), "bytes": None}],
        "events": [[{"label": "Dog", "onset": 3.0, "offset": 4.0}, {"label": "Speech", "onset": 0.4, "offset": 1.0}],
                   [{"label": "Dog", "onset": 0.25, "offset": 0.5}]],
    }
    transform = StrongLabelTransform(fe, LABELS, grid, train=True)
    np.random.seed(3)
    dog_windows = [0, 0]
    for _ in range(8):
        out = transform(batch)
        for clip, (features, frame_labels, labels) in enumerate(zip(out["input_features"], out["frame_labels"],
                                                                    out["labels"])):
            assert tuple(features.shape) == (201, 64) and frame_labels.shape == (16, 2)
            np.testing.assert_array_equal(labels, (frame_labels.max(axis=0) > 0).astype(np.float32))
            step_energy = step_tone_energy(features, TONES["Dog"], fe, 16)
            loud = step_energy > step_energy.min() + 20
            assert (frame_labels[loud, 0] > 0).all()  # where the tone is heard there is a target ...
            full, empty = frame_labels[:, 0] == 1.0, frame_labels[:, 0] == 0.0
            if full.any():
                dog_windows[clip] += 1
                assert step_energy[full].min() > step_energy[empty].max() + 10  # ... and targets sit on the tone
    assert dog_windows[1] == 8 and dog_windows[0] >= 2  # the short clip always, the long one in some crops
    center = StrongLabelTransform(fe, LABELS, grid, train=False)(batch)  # 6-s clip: the window 2-4 s
    assert np.flatnonzero(center["frame_labels"][0][:, 0]).tolist() == list(range(8, 16))


def test_windows_longer_than_one_image_are_refused():
    fe = HTSATFeatureExtractor(max_length_seconds=2.0)
    with pytest.raises(ValueError, match="the model would crop them"):
        StrongLabelTransform(fe, LABELS, StepGrid.from_config(tiny_config()), max_length_seconds=3.0)


# -------------------------------------------------------------------------------------------------- collator
def test_collator_stacks_and_mixes_frame_labels_with_the_clip_labels():
    rng = np.random.default_rng(0)
    features = [
        {"input_features": rng.standard_normal((201, 64)).astype(np.float32),
         "labels": rng.integers(0, 2, 2).astype(np.float32),
         "frame_labels": rng.random((16, 2)).astype(np.float32)}
        for _ in range(3)
    ]
    frames = torch.stack([torch.from_numpy(f["frame_labels"]) for f in features])
    clips = torch.stack([torch.from_numpy(f["labels"]) for f in features])
    plain = HTSATDataCollator(num_labels=2)(features)
    assert plain["frame_labels"].dtype == torch.float32 and torch.equal(plain["frame_labels"], frames)
    mixed = HTSATDataCollator(num_labels=2, mixup_alpha=0.5, seed=0)(features)
    lam = mixed["mixup_lambda"]
    assert torch.allclose(mixed["frame_labels"], frames * lam.view(-1, 1, 1) + frames.flip(0) * (1 - lam.view(-1, 1, 1)))
    assert torch.allclose(mixed["labels"], clips * lam.view(-1, 1) + clips.flip(0) * (1 - lam.view(-1, 1)))
    unmixed = HTSATDataCollator(num_labels=2, mixup_alpha=0.5, mix_targets=False, seed=0)(features)
    assert "mixup_lambda" in unmixed and torch.equal(unmixed["frame_labels"], frames)


# ---------------------------------------------------------------------------------------------------- errors
@needs_torchcodec
def test_missing_audio_and_malformed_rows_name_the_tsv_line(tmp_path):
    write_clip(tmp_path / "audio" / "a.wav", 2.0, [("Dog", 0.5, 1.0)])
    tsv = write_tsv(tmp_path / "train.tsv", {"a.wav": [("Dog", 0.5, 1.0)], "gone.wav": [("Speech", 0.0, 1.0)]})
    with pytest.raises(BadExampleError, match=r"train\.tsv, line 3: audio file .*audio/gone\.wav not found"):
        load_strong_labels(tsv, audio_dir=tmp_path / "audio")
    source = load_strong_labels(tsv, audio_dir=tmp_path / "audio", skip_bad_examples=True)
    assert len(source.splits["train"]) == 1 and source.names == ["Dog", "Speech"]
    assert source.reports[0].skipped == [(3, str(tmp_path / "audio" / "gone.wav"), "audio file not found")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("filename\tonset\toffset\tevent_label\na.wav\t0.5\t1.0\tDog\na.wav\tsoon\t1.0\tSpeech\n")
    with pytest.raises(ValueError, match=r"bad\.tsv, line 3: onset is not a number"):
        load_strong_labels(bad, audio_dir=tmp_path / "audio")
    overlapping = write_tsv(tmp_path / "overlap.tsv", {"a.wav": [("Dog", 0.0, 1.0), ("Dog", 0.5, 1.5)]})
    assert len(read_strong_labels(overlapping)["a.wav"]) == 2  # same-class overlaps: the targets take the union
    unknown = write_tsv(tmp_path / "eval.tsv", {"a.wav": [("Cat", 0.0, 1.0)]})
    with pytest.raises(ValueError, match=r"eval\.tsv, line 2: unknown event label 'Cat'"):
        load_strong_labels(tsv, unknown, audio_dir=tmp_path / "audio", skip_bad_examples=True)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def desed_folder(tmp_path_factory) -> Path:
    """A DESED-like folder: audio/{train,validation}/*.wav and metadata/{train,validation}.tsv."""
    root = tmp_path_factory.mktemp("desed")
    rng = np.random.default_rng(1)
    splits = {"train": 8, "validation": 4}
    for split, count in splits.items():
        clips: dict[str, list[tuple[str, float, float]]] = {}
        for i in range(count):
            seconds = (3.0, 2.0, 1.5)[i % 3]
            events = []
            if i % 4 != 3:  # every fourth clip has no events
                onset = float(np.round(rng.uniform(0.0, seconds - 0.8), 3))
                events.append(("Dog" if i % 2 else "Speech", onset, round(onset + 0.6, 3)))
            write_clip(root / "audio" / split / f"clip{i}.wav", seconds, events, seed=i)
            clips[f"clip{i}.wav"] = events
        if split == "train":
            clips["missing.wav"] = [("Dog", 0.0, 1.0)]
        (root / "metadata").mkdir(exist_ok=True)
        write_tsv(root / "metadata" / f"{split}.tsv", clips)
    return root


@needs_torchcodec
def test_train_py_trains_sound_event_detection_on_a_tsv_folder(desed_folder, tmp_path, monkeypatch):
    import torch.nn.functional as F
    from transformers import AutoModelForAudioFrameClassification, pipeline

    from htsat_hf.training.run import main

    seen: list[dict] = []
    original_forward = HTSATForSoundEventDetection.forward

    def spy(self, input_features, labels=None, frame_labels=None, **kwargs):
        output = original_forward(self, input_features, labels=labels, frame_labels=frame_labels, **kwargs)
        if self.training and labels is not None:
            clip_only = F.binary_cross_entropy_with_logits(output.logits, labels)
            frame_term = F.binary_cross_entropy_with_logits(output.frame_logits, frame_labels)
            seen.append({"frame_labels": None if frame_labels is None else tuple(frame_labels.shape),
                         "mixup": kwargs.get("mixup_lambda") is not None,
                         "loss": output.loss.item(), "clip_plus_frame": (clip_only + frame_term).item(),
                         "clip_only": clip_only.item()})
        return output

    monkeypatch.setattr(HTSATForSoundEventDetection, "forward", spy)
    out = tmp_path / "sed"
    results = main([
        "--strong_labels_train", str(desed_folder / "metadata" / "train.tsv"),
        "--audio_dir", str(desed_folder / "audio" / "train"),
        "--strong_labels_eval", str(desed_folder / "metadata" / "validation.tsv"),
        "--eval_audio_dir", str(desed_folder / "audio" / "validation"),
        "--skip_bad_examples", "--output_dir", str(out), *TINY_SED,
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--num_train_epochs", "2",
        "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "--report_to", "none", "--seed", "0",
        "--disable_tqdm", "True", "--dataloader_num_workers", "0",
    ])
    assert len(seen) == 4  # 8 clips (the missing one skipped) / batch 4 x 2 epochs
    for step in seen:
        assert step["frame_labels"] == (4, 16, 2) and step["mixup"]
        assert step["loss"] == pytest.approx(step["clip_plus_frame"], rel=1e-5)
        assert step["loss"] > step["clip_only"] + 1e-3  # the frame term is in the loss
    assert results["train_num_skipped_examples"] == 1 and results["eval_num_skipped_examples"] == 0  # per split
    for key in ("eval_mAP", "eval_frame_mAP", "eval_frame_f1"):
        assert key in results and (np.isnan(results[key]) or 0.0 <= results[key] <= 1.0)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["HTSATForSoundEventDetection"]
    assert config["id2label"] == {"0": "Dog", "1": "Speech"}
    assert config["problem_type"] == "multi_label_classification"

    model = AutoModelForAudioFrameClassification.from_pretrained(out)
    assert isinstance(model, HTSATForSoundEventDetection)
    detector = pipeline("sound-event-detection", model=str(out))
    result = detector(str(desed_folder / "audio" / "validation" / "clip0.wav"), return_frame_scores=True)
    assert result["labels"] == ["Dog", "Speech"] and result["frame_scores"].shape[1] == 2
    assert all(event["label"] in ("Dog", "Speech") for event in result["events"])


def test_train_py_refuses_strong_labels_with_options_that_break_the_alignment(desed_folder, tmp_path):
    from htsat_hf.training.run import main

    common = ["--strong_labels_train", str(desed_folder / "metadata" / "train.tsv"), "--audio_dir",
              str(desed_folder / "audio" / "train"), "--output_dir", str(tmp_path / "x"), *TINY_SED, "--use_cpu",
              "--report_to", "none"]
    with pytest.raises(ValueError, match="--eval_crop must be 'center'"):
        main([*common, "--eval_crop", "none", "--do_eval", "False"])
    with pytest.raises(ValueError, match="needs --strong_labels_eval or --validation_split_fraction"):
        main(common)
    with pytest.raises(BadExampleError, match=r"train\.tsv, line \d+: audio file .*missing\.wav not found"):
        main([*common, "--do_eval", "False"])


@needs_torchcodec
@pytest.mark.slow  # 2-process DDP training, end to end
def test_strong_label_training_under_two_process_ddp_evaluates_like_one_process(desed_folder, tmp_path):
    """`accelerate launch` with 2 CPU processes: frame targets are sharded with their clips, and the evaluation
    gathered from both ranks (clip and frame metrics) equals a one-process evaluation of the saved model."""
    from htsat_hf.training.run import main

    command = two_process_train_command()
    data = ["--strong_labels_train", str(desed_folder / "metadata" / "train.tsv"),
            "--audio_dir", str(desed_folder / "audio" / "train"),
            "--strong_labels_eval", str(desed_folder / "metadata" / "validation.tsv"),
            "--eval_audio_dir", str(desed_folder / "audio" / "validation"), "--skip_bad_examples",
            "--per_device_eval_batch_size", "2", "--use_cpu", "--report_to", "none", "--disable_tqdm", "True"]
    out = tmp_path / "ddp"
    command += [
        *data, *TINY_SED, "--output_dir", str(out),
        "--per_device_train_batch_size", "2", "--num_train_epochs", "2", "--logging_steps", "1",
        "--save_strategy", "no", "--seed", "0", "--ddp_find_unused_parameters", "False",
    ]
    result = subprocess.run(command, env=training_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "Process rank 0 of 2" in result.stdout + result.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4  # 8 usable clips / (2 ranks x 2) = 2 steps per epoch, 2 epochs
    ddp = json.loads((out / "all_results.json").read_text())
    assert ddp["train_num_skipped_examples"] == 1 and ddp["eval_num_skipped_examples"] == 0
    single = main([*data, "--model_name_or_path", str(out), "--do_train", "False", "--output_dir", str(tmp_path / "e")])
    for key in ("eval_mAP", "eval_frame_mAP", "eval_frame_f1", "eval_loss"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-5, abs=1e-7), key
