"""Strong labels: DESED-style events -> targets on the token-semantic grid, and training on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import needs_torchcodec, shared_path

from htsat_hf import HTSATConfig, HTSATForSoundEventDetection
from htsat_hf.training.strong_labels import clip_targets_from_steps, events_to_step_targets, read_strong_labels

LABELS = {"Dog": 0, "Speech": 1}


def test_step_targets_are_the_covered_fraction_of_each_step():
    events = [{"label": "Dog", "onset": 0.5, "offset": 1.25}, {"event_label": "Speech", "onset": 2.0, "offset": 9.0}]
    targets = events_to_step_targets(events, num_steps=4, step_seconds=0.5, label2id=LABELS)
    np.testing.assert_allclose(targets[:, 0], [0.0, 1.0, 0.5, 0.0])
    np.testing.assert_allclose(targets[:, 1], [0.0, 0.0, 0.0, 0.0])
    shifted = events_to_step_targets(events, num_steps=4, step_seconds=0.5, label2id=LABELS, offset_seconds=1.5)
    np.testing.assert_allclose(shifted[:, 1], [0.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(clip_targets_from_steps(targets), [1.0, 0.0])
    with pytest.raises(ValueError, match="'Cat' is not one of the model's labels"):
        events_to_step_targets([{"label": "Cat", "onset": 0, "offset": 1}], 4, 0.5, LABELS)


def test_desed_tsv_is_read_per_file_with_empty_files():
    events = read_strong_labels(shared_path("fixtures", "desed_dcase2021_baseline", "validation.tsv"))
    assert len(events) == 1168
    assert events["YU0Cg_t_3TdI_30.000_40.000.wav"] == []
    first = events["Y00pbt6aJV8Y_350.000_360.000.wav"][0]
    assert first == {"label": "Vacuum_cleaner", "onset": 0.0, "offset": 9.971}


def test_malformed_tsv_names_file_and_line(tmp_path):
    bad = tmp_path / "strong.tsv"
    bad.write_text("filename\tonset\toffset\tevent_label\na.wav\t1.0\t0.5\tDog\n")
    with pytest.raises(ValueError, match="strong.tsv.*line 2"):
        read_strong_labels(bad)


def test_training_on_strong_labels_reduces_the_frame_loss():
    torch.manual_seed(0)
    config = HTSATConfig(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], num_labels=2,
                         id2label={0: "Dog", 1: "Speech"}, spec_augment=False, drop_path_rate=0.0)
    model = HTSATForSoundEventDetection(config)
    features = torch.randn(2, 1001, 64) * 5 - 40
    features[0, 300:600] += 30  # a loud stretch where the "Dog" event is
    step = model.frame_step_seconds(1001)
    frame_labels = torch.tensor(np.stack([
        events_to_step_targets([{"label": "Dog", "onset": 3.0, "offset": 6.0}], 32, step, config.label2id),
        events_to_step_targets([], 32, step, config.label2id),
    ]))
    clip_labels = frame_labels.amax(dim=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(features, labels=clip_labels, frame_labels=frame_labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    with torch.no_grad():
        scores = model(features).frame_logits.sigmoid()[0, :, 0]
    inside = scores[int(3.2 / step) : int(5.8 / step)].mean()
    outside = torch.cat([scores[: int(2.5 / step)], scores[int(6.5 / step) :]]).mean()
    assert inside > outside + 0.3


@needs_torchcodec
def test_strong_label_scene_dataset_lists_every_event_it_placed(tmp_path):
    """`demo.data.build_strong_label_scene_dataset` (the live benchmark's training data): every clip is a
    `clip_seconds` file, its TSV rows are the events `sound_event_scene` placed (same seed), and the TSVs load as
    training splits of the four classes."""
    import soundfile as sf

    from htsat_hf.demo.data import SOUND_CLASSES, build_strong_label_scene_dataset, sound_event_scene
    from htsat_hf.training.strong_labels import load_strong_labels

    root = build_strong_label_scene_dataset(tmp_path / "scenes", clips=(3, 2), clip_seconds=4.0, rate=8000, seed=5)
    for s, (split, count) in enumerate((("train", 3), ("eval", 2))):
        table = read_strong_labels(root / "metadata" / f"{split}.tsv")
        assert sorted(table) == [f"{n:04d}.wav" for n in range(count)]
        for n in range(count):
            audio, rate = sf.read(root / "audio" / split / f"{n:04d}.wav")
            assert rate == 8000 and len(audio) == 4 * 8000
            _, placed = sound_event_scene(4.0, 8000, np.random.default_rng([5, 100 + s, n]))
            listed = table[f"{n:04d}.wav"]
            assert [(e["label"], e["onset"], e["offset"]) for e in listed] == [
                (e["event_label"], round(e["onset"], 3), round(e["offset"], 3)) for e in placed]
    source = load_strong_labels(root / "metadata" / "train.tsv", root / "metadata" / "eval.tsv",
                                root / "audio" / "train", root / "audio" / "eval")
    assert set(source.names) <= set(SOUND_CLASSES) and len(source.splits["train"]) == 3
    assert len(source.splits["eval"]) == 2
