"""Label parsing, manifests, dataset layouts and bad-data errors of `htsat_hf.training.data` / `labels`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import needs_torchcodec, shared_path
from datasets import Dataset, List, Value

from htsat_hf import HTSATFeatureExtractor
from htsat_hf.training.data import (
    AudioTransform,
    BadExampleError,
    build_label_space,
    fold_values,
    load_source,
    prepare_data,
    select_splits,
    validate_split,
)
from htsat_hf.training.labels import LabelError, LabelSpace, read_label_csv


def write_wav(path: Path, seconds: float = 0.5, rate: int = 16000, freq: float = 440.0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)
    return str(path)


def write_manifest(path: Path, rows: list[dict]) -> str:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


# ------------------------------------------------------------------------------------------------------ labels
def test_label_space_forms():
    single = LabelSpace(["dog", "cat", "Electric guitar"])
    assert single.encode("cat") == 1 and single.encode(2) == 2
    assert single.encode("electric_guitar") == 2  # FSD50K spelling
    multi = LabelSpace(["dog", "cat", "bird"], multi_label=True)
    assert multi.encode("dog, bird").tolist() == [1, 0, 1]  # comma-joined
    assert multi.encode(["cat"]).tolist() == [0, 1, 0]
    assert multi.indices("bird,dog") == [0, 2]
    with pytest.raises(LabelError, match="unknown label 'cow'"):
        single.encode("cow")
    with pytest.raises(LabelError, match="missing label"):
        single.encode(None)
    with pytest.raises(LabelError, match="outside"):
        single.encode(7)
    with pytest.raises(LabelError, match="single-label"):
        single.encode(["dog", "cat"])


def test_audioset_label_csv_maps_mids_and_names():
    names, mids = read_label_csv(shared_path("data", "audioset_class_labels_indices.csv"))
    assert len(names) == 527 and names[0] == "Speech" and mids["/m/09x0r"] == 0
    space = LabelSpace(names, multi_label=True, aliases=mids)
    target = space.encode(["/m/09x0r", "Male speech, man speaking"])
    assert target.shape == (527,) and target[[0, 1]].tolist() == [1, 1] and target.sum() == 2


def test_fsd50k_style_vocabulary(tmp_path):
    vocab = tmp_path / "vocabulary.csv"
    vocab.write_text("0,Accelerating_and_revving_and_vroom,/m/07q2z82\n1,Accordion,/m/0mkg\n")
    names, mids = read_label_csv(vocab)
    assert names == ["Accelerating_and_revving_and_vroom", "Accordion"] and mids["/m/0mkg"] == 1


def test_build_label_space_detects_forms():
    ds = Dataset.from_dict({"audio": ["a", "b"], "label": ["dog", "cat"]})
    space = build_label_space(ds, "label")
    assert space.names == ["cat", "dog"] and not space.multi_label
    ds = Dataset.from_dict({"audio": ["a", "b"], "labels": ["Dog,Bark", "Cat"]})
    space = build_label_space(ds, "labels")
    assert space.multi_label and space.names == ["Bark", "Cat", "Dog"]
    ds = Dataset.from_dict({"audio": ["a"], "labels": [["x", "y"]]}, features=None)
    assert build_label_space(ds, "labels").multi_label
    ds = Dataset.from_dict({"audio": ["a", "b"], "target": [1, 0], "category": ["rain", "dog"], "fold": [1, 2]})
    assert build_label_space(ds, "target").names == ["dog", "rain"]  # ESC-50: target named by category
    with pytest.raises(ValueError, match="No label column 'label'"):
        build_label_space(ds, "label")


# ------------------------------------------------------------------------------------- manifests & bad examples
def test_manifest_bad_rows_are_named_or_skipped(tmp_path):
    audio = tmp_path / "audio"
    good = write_wav(audio / "good.wav")
    write_wav(audio / "good2.wav", freq=880)
    (audio / "corrupt.wav").write_bytes(b"RIFF....not audio at all" * 20)
    rows = [
        {"path": "audio/good.wav", "label": "dog"},
        {"path": "audio/good2.wav", "label": "cat"},
        {"path": "audio/missing.wav", "label": "dog"},
        {"path": "audio/corrupt.wav", "label": "cat"},
        {"path": "audio/good.wav", "label": ""},
    ]
    manifest = write_manifest(tmp_path / "train.csv", rows)
    raw = load_source(None, train_file=manifest, audio_column="path")
    train = raw["train"]
    assert train[0]["path"]["path"] == good  # relative path resolved against the manifest's folder
    space = LabelSpace(["cat", "dog"])
    with pytest.raises(BadExampleError, match=r"row 2 \(.*missing\.wav\): audio file not found"):
        validate_split(train, "train", "path", "label", space)
    kept, report = validate_split(train.select([0, 1, 3]), "train", "path", "label", space, check_audio=True,
                                  skip_bad_examples=True)
    assert len(kept) == 2 and [s[1].endswith("corrupt.wav") for s in report.skipped] == [True]
    assert "unreadable audio" in report.skipped[0][2]
    with pytest.raises(BadExampleError, match=r"row 2 .*good\.wav\): missing label"):
        validate_split(train.select([0, 1, 4]).flatten_indices(), "train", "path", "label", space)
    _, report = validate_split(train, "train", "path", "label", space, check_audio=True, skip_bad_examples=True)
    assert sorted(r for r, _, _ in report.skipped) == [2, 3, 4]
    unknown = Dataset.from_dict({"path": [good], "label": ["cow"]}).cast_column("path", train.features["path"])
    with pytest.raises(BadExampleError, match=r"row 0 \(.*good\.wav\): unknown label 'cow'"):
        validate_split(unknown, "eval", "path", "label", space)
    with pytest.raises(BadExampleError, match="eval split is empty"):
        validate_split(unknown.select([]), "eval", "path", "label", space)


@needs_torchcodec
def test_transform_crops_repeats_and_names_unreadable_files(tmp_path):
    fe = HTSATFeatureExtractor(max_length_seconds=2.0)
    long_clip = write_wav(tmp_path / "long.wav", seconds=3.3, rate=22050)
    short_clip = write_wav(tmp_path / "short.wav", seconds=0.4, rate=16000)
    batch = {"audio": [{"path": long_clip, "bytes": None}, {"path": short_clip, "bytes": None}], "label": ["a", "b"]}
    space = LabelSpace(["a", "b"])
    out = AudioTransform(fe, space, train=True)(batch)
    frames = 2 * 32000 // 320 + 1
    assert [tuple(x.shape) for x in out["input_features"]] == [(frames, 64), (frames, 64)]
    assert out["labels"] == [0, 1]
    whole = AudioTransform(fe, space, train=False, eval_crop="none")(batch)
    assert whole["input_features"][0].shape[0] == int(3.3 * 32000) // 320 + 1  # long eval clip kept whole
    bad = {"audio": [{"path": str(tmp_path / "nope.wav"), "bytes": None}], "label": ["a"]}
    with pytest.raises(BadExampleError, match="nope.wav"):
        AudioTransform(fe, space)(bad)
    skipping = AudioTransform(fe, space, skip_bad_examples=True)
    assert skipping(bad)["input_features"] == [] and skipping.skipped == 1


@needs_torchcodec
def test_json_manifest_multi_label_and_prepare(tmp_path):
    clip = write_wav(tmp_path / "x.wav")
    lines = [{"file": "x.wav", "labels": ["/m/09x0r", "/m/05zppz"]}, {"file": "x.wav", "labels": ["/m/09x0r"]}]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines))
    raw = load_source(None, train_file=str(manifest), audio_column="file")
    train, eval_ = select_splits(raw, eval_split=None)
    assert eval_ is None and train[0]["file"]["path"] == clip
    space = build_label_space(train, "labels", label_csv=str(shared_path("data", "audioset_class_labels_indices.csv")))
    assert space.multi_label and space.num_labels == 527
    prepared = prepare_data(train, None, HTSATFeatureExtractor(max_length_seconds=1.0), "file", "labels", space)
    item = prepared.train[0]
    assert item["labels"].shape == (527,) and prepared.train_example_labels[0] == [0, 1]


@needs_torchcodec
def test_esc50_layout_and_folds(tmp_path):
    root = tmp_path / "ESC-50-master"
    rows = []
    for i in range(6):
        name = f"{i % 3 + 1}-{i}-A-{i % 2}.wav"
        write_wav(root / "audio" / name, freq=300 + 100 * i)
        rows.append({"filename": name, "fold": i % 3 + 1, "target": i % 2, "category": ["dog", "rooster"][i % 2],
                     "esc10": "True", "src_file": i, "take": "A"})
    (root / "meta").mkdir()
    write_manifest(root / "meta" / "esc50.csv", rows)
    raw = load_source(str(root))
    assert fold_values(raw["train"]) == [1, 2, 3]
    train, eval_ = select_splits(raw, eval_fold="2")
    assert sorted(set(eval_["fold"])) == [2] and 2 not in train["fold"] and len(train) + len(eval_) == 6
    assert build_label_space(train, "target").names == ["dog", "rooster"]
    with pytest.raises(BadExampleError, match="Fold '9' has no rows"):
        select_splits(raw, eval_fold="9")


@needs_torchcodec
def test_speech_commands_layout(tmp_path):
    root = tmp_path / "sc"
    for word in ("yes", "no"):
        for speaker in ("aa", "bb", "cc"):
            write_wav(root / word / f"{speaker}_nohash_0.wav", seconds=1.0)
    write_wav(root / "_background_noise_" / "white.wav", seconds=1.0)
    (root / "validation_list.txt").write_text("yes/bb_nohash_0.wav\nno/bb_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("yes/cc_nohash_0.wav\n")
    raw = load_source(str(root))
    assert {k: len(v) for k, v in raw.items()} == {"train": 3, "validation": 2, "test": 1}
    assert raw["train"].features["label"].names == ["no", "yes"]
    assert set(raw["validation"]["speaker_id"]) == {"bb"}


@needs_torchcodec
def test_missing_splits_are_reported(tmp_path):
    write_wav(tmp_path / "af" / "dog" / "a.wav")
    raw = load_source(str(tmp_path / "af"))
    with pytest.raises(BadExampleError, match=r"No evaluation split 'validation'; available splits: \['train'\]"):
        select_splits(raw, eval_split="validation")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source(str(tmp_path / "nothing_here"))


@pytest.mark.parametrize("content, what", [("audio,label\n", "only a header"), ("", "nothing")])
def test_an_empty_eval_manifest_names_the_split_and_file(tmp_path, content, what):
    from htsat_hf.training.run import cli

    sf.write(tmp_path / "a.wav", np.zeros(16000, np.float32), 16000)
    (tmp_path / "train.csv").write_text("audio,label\na.wav,x\n")
    (tmp_path / "eval.csv").write_text(content)
    with pytest.raises(SystemExit, match=rf"error: The eval manifest .*eval.csv holds {what}: no examples"):
        cli(["--train_file", str(tmp_path / "train.csv"), "--eval_file", str(tmp_path / "eval.csv"),
             "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--use_cpu"])


@pytest.mark.parametrize(
    "suffix, subtype", [(".wav", "PCM_16"), (".wav", "PCM_24"), (".wav", "FLOAT"), (".flac", "PCM_16")]
)
@needs_torchcodec
def test_native_mono_reads_equal_the_ffmpeg_decoder(tmp_path, suffix, subtype):
    """libsndfile's fast path returns exactly the samples `datasets` decodes, from a path or from bytes."""
    from datasets import Audio

    from htsat_hf.training.data import read_native_mono

    rng = np.random.default_rng(0)
    path = tmp_path / f"clip{suffix}"
    sf.write(path, (rng.standard_normal(8000) * 0.3).clip(-1, 0.99).astype(np.float32), 16000, subtype=subtype)
    expected = np.asarray(Audio(sampling_rate=16000, num_channels=1).decode_example({"path": str(path), "bytes": None})["array"])
    for cell in ({"path": str(path), "bytes": None}, {"path": None, "bytes": path.read_bytes()}):
        fast = read_native_mono(cell, 16000)
        assert fast is not None and fast.dtype == np.float32
        np.testing.assert_array_equal(fast, expected)


def test_training_averages_the_channels_as_the_pipelines_do(tmp_path):
    """Training decoded with datasets' `num_channels=1` (FFmpeg's -ac 1 matrix, +3 dB for stereo) while every
    inference path averages the channels: a model was trained on louder stereo clips than it was run on."""
    from htsat_hf.pipeline_htsat import audio_source

    t = np.arange(3 * 44100) / 44100
    stereo = np.stack([0.4 * np.sin(2 * np.pi * 440 * t), 0.1 * np.sin(2 * np.pi * 3000 * t)], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo.astype(np.float32), 44100, subtype="FLOAT")
    transform = AudioTransform(HTSATFeatureExtractor(), None, label_column=None)
    expected = audio_source(str(path), 32000).samples()
    for cell in ({"path": str(path), "bytes": None}, {"path": None, "bytes": path.read_bytes()}):
        np.testing.assert_array_equal(transform.decode(cell), expected)


def test_native_mono_leaves_resampling_downmixing_and_errors_to_ffmpeg(tmp_path):
    from htsat_hf.training.data import read_native_mono

    mono, stereo = tmp_path / "mono.wav", tmp_path / "stereo.wav"
    sf.write(mono, np.zeros(1600, np.float32), 16000)
    sf.write(stereo, np.zeros((1600, 2), np.float32), 16000)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really")
    assert read_native_mono({"path": str(mono), "bytes": None}, 32000) is None  # needs resampling
    assert read_native_mono({"path": str(mono), "bytes": None}, None).shape == (1600,)  # any rate: the audio check
    assert read_native_mono({"path": str(stereo), "bytes": None}, 16000) is None  # needs the decoder's downmix
    assert read_native_mono({"path": str(broken), "bytes": None}, 16000) is None  # datasets names the error
    assert read_native_mono({"path": str(tmp_path / "missing.wav"), "bytes": None}, 16000) is None
    transform = AudioTransform(HTSATFeatureExtractor(sampling_rate=16000, hop_length=160, f_max=8000.0,
                                                     max_length_seconds=0.5), labels=None, label_column=None)
    with pytest.raises(BadExampleError, match="broken.wav"):
        transform({"audio": [{"path": str(broken), "bytes": None}]})
