"""Arguments and settings checked as Transformers does: the pipelines' (misspelt or bad ones raise naming the argument,
`batch_size=` gives the unbatched results) and the command-line tools' (usage errors before any work)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from transformers import pipeline

from conftest import save_tiny_classifier, save_tiny_detector

RATE = 32000


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return pipeline("sound-event-detection", model=str(save_tiny_detector(tmp_path_factory.mktemp("sed"))))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return pipeline("audio-classification", model=str(save_tiny_classifier(tmp_path_factory.mktemp("cls"))))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two files: one shorter than a window, one of two windows."""
    folder = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    paths = []
    for index, seconds in enumerate((3.0, 12.0)):
        paths.append(str(folder / f"clip{index}.flac"))
        sf.write(paths[-1], (rng.standard_normal(int(seconds * RATE)) * 0.1).astype(np.float32), RATE)
    return paths


def audio(seconds: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(1).standard_normal(int(seconds * RATE)) * 0.1).astype(np.float32)


@pytest.mark.parametrize("task, misspelt, meant", [
    ("sound-event-detection", "tresholds", "threshold"),
    ("sound-event-detection", "min_duration", "min_duration_seconds"),
    ("audio-classification", "topk", "top_k"),
])
def test_misspelt_arguments_raise_naming_them(detector, classifier, task, misspelt, meant):
    pipe = detector if task == "sound-event-detection" else classifier
    message = rf"unexpected keyword argument '{misspelt}' \(did you mean '{meant}'\?\); it takes: .*batch_size"
    with pytest.raises(TypeError, match=message):
        pipe(audio(), **{misspelt: 0.3})
    with pytest.raises(TypeError, match=message):  # at construction too: the same parameters
        type(pipe)(model=pipe.model, feature_extractor=pipe.feature_extractor, **{misspelt: 0.3})


def test_transformers_own_arguments_still_work(classifier):
    assert classifier(audio(), top_k=2, function_to_apply="softmax", batch_size=1, num_workers=0)[0]["score"] <= 1
    with pytest.raises(ValueError, match="function_to_apply"):
        classifier(audio(), function_to_apply="tanh")


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_duration_seconds=float("nan")), "min_duration_seconds must be a finite number"),
    (dict(median_filter_seconds=float("inf")), "median_filter_seconds must be a finite number"),
    (dict(threshold="high"), "threshold must be a number"),
    (dict(window_batch_size=0), "window_batch_size must be a whole number >= 1, got 0"),
    (dict(window_batch_size=2.5), "window_batch_size must be a whole number"),
    (dict(return_frame_scores="no"), "return_frame_scores must be True or False"),
    (dict(progress="yes"), "progress must be True or False"),
    (dict(label_mapping=["tone"]), "label_mapping must be a dict .* or the path of a JSON/YAML file of one, got list"),
])
def test_bad_detection_settings_raise_before_any_work(detector, kwargs, message):
    with pytest.raises(ValueError, match=message):
        detector(audio(), **kwargs)
    with pytest.raises(ValueError, match=message):
        pipeline("sound-event-detection", model=detector.model, feature_extractor=detector.feature_extractor, **kwargs)


def test_label_dependent_settings_are_checked_before_the_audio_is_read(detector, monkeypatch):
    import htsat_hf.pipeline_htsat as pipeline_module

    def unreachable(*args, **kwargs):
        raise AssertionError("the audio was read before the settings were checked")

    monkeypatch.setattr(pipeline_module.WindowStream, "window_batches", unreachable)
    for keep_scores in (False, True):
        with pytest.raises(ValueError, match="unknown labels"):
            detector(audio(), threshold={"bark": 0.3}, return_frame_scores=keep_scores)


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=-1), "top_k must be a whole number >= 1, got -1"),
    (dict(top_k=0), "top_k must be a whole number >= 1, got 0"),
    (dict(top_k=1.5), "top_k must be a whole number"),
    (dict(window_batch_size=-3), "window_batch_size must be a whole number >= 1"),
])
def test_bad_classification_settings_raise_naming_them(classifier, kwargs, message):
    with pytest.raises(ValueError, match=message):
        classifier(audio(), **kwargs)


def test_batch_size_gives_the_unbatched_events(detector, files):
    for kwargs in (dict(), dict(return_frame_scores=True, threshold=0.4)):
        alone = [detector(path, **kwargs) for path in files]
        batched = detector(files, batch_size=2, **kwargs)
        assert [result["events"] for result in batched] == [result["events"] for result in alone]
        for one, other in zip(batched, alone):
            assert set(one) == set(other)
            if "frame_scores" in one:
                np.testing.assert_array_equal(one["frame_scores"], other["frame_scores"])
                np.testing.assert_array_equal(one["frame_times"], other["frame_times"])


def test_batch_size_gives_the_unbatched_tags(classifier, files):
    alone = [classifier(path, top_k=3) for path in files]
    batched = classifier(files, top_k=3, batch_size=2)
    assert [[tag["label"] for tag in tags] for tags in batched] == [[tag["label"] for tag in tags] for tags in alone]
    for tags, expected in zip(batched, alone):  # windows of several inputs share forward passes: same arithmetic
        assert [tag["score"] for tag in tags] == pytest.approx([tag["score"] for tag in expected], abs=1e-6)


def test_a_call_threshold_may_name_the_labels_of_a_mapping_given_at_construction(detector):
    mapped = pipeline("sound-event-detection", model=detector.model, feature_extractor=detector.feature_extractor,
                      label_mapping={"loud": ["tone", "noise"]})
    assert {event["label"] for event in mapped(audio(), threshold={"loud": 0.0})["events"]} == {"loud"}
    with pytest.raises(ValueError, match="unknown labels"):
        mapped(audio(), threshold={"tone": 0.3})
    with pytest.raises(ValueError, match="unknown labels"):  # at construction: before any input
        pipeline("sound-event-detection", model=detector.model, feature_extractor=detector.feature_extractor,
                 threshold={"bark": 0.3})


def test_construction_settings_stay_when_a_call_adds_others(detector):
    """Transformers merges the forward parameters key by key: the streaming path's settings dict given at a call
    replaced the whole of the constructor's, so `threshold=` given at construction was lost."""
    low = pipeline("sound-event-detection", model=detector.model, feature_extractor=detector.feature_extractor,
                   threshold=0.0)
    expected = detector(audio(12.0), threshold=0.0, min_gap_seconds=0.1)["events"]
    assert expected != detector(audio(12.0), min_gap_seconds=0.1)["events"]
    assert low(audio(12.0), min_gap_seconds=0.1)["events"] == expected


# ------------------------------------------------------------------ htsat-hf detect
def run_detect_events(argv: list[str], capsys) -> tuple[int, str]:
    from htsat_hf.commands import detect

    try:
        status = detect.main(argv)
    except SystemExit as exit:
        status = exit.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--window-batch-size", "0"], r"argument --window-batch-size: expected a whole number >= 1, got 0"),
    (["--min-duration", "nan"], r"argument --min-duration: expected a finite number of seconds >= 0, got 'nan'"),
    (["--median-filter", "-1"], r"argument --median-filter: expected a finite number"),
    (["--threshold", "1.5"], r"argument --threshold: threshold must be in \[0, 1\], got 1.5"),
    (["--hysteresis", "0.2", "0.6"], r"argument --hysteresis: hysteresis offset threshold 0.6 must be <= onset"),
    (["--label-mapping", "missing.json"], r"argument --label-mapping: .*missing.json"),
])
def test_detect_events_refuses_bad_settings_before_loading_the_model(flags, message, files, capsys, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "pipeline", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    status, err = run_detect_events([files[0], "--model", "unused", *flags], capsys)
    assert status == 2
    assert re_search(message, err)


def test_detect_events_checks_its_paths_and_labels_before_any_file(detector, files, tmp_path, capsys, monkeypatch):
    import htsat_hf.pipeline_htsat as pipeline_module

    monkeypatch.setattr(pipeline_module, "audio_source", lambda *args: pytest.fail("a file was read"))
    folder = str(tmp_path)
    detector.model.save_pretrained(tmp_path / "model")
    detector.feature_extractor.save_pretrained(tmp_path / "model")
    model = ["--model", str(tmp_path / "model")]
    for argv, message in [
        ([files[0], *model, "--output", folder], rf"argument --output: {folder} is a directory"),
        ([files[0], *model, "--output", str(tmp_path / "no" / "events.tsv")], "does not exist"),
        ([files[0], *model, "--plot", folder], rf"argument --plot: {folder} is a directory"),
        ([*files, *model, "--plot", files[0]], "names a folder"),
        ([*files, *model, "--threshold", '{"bark": 0.3}'], r"threshold names unknown labels \['bark'\]"),
    ]:
        status, err = run_detect_events(argv, capsys)
        assert status == 2 and re_search(message, err), err


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


# ------------------------------------------------------------------ htsat-hf listen
def run_listen(argv: list[str], stdin_bytes: bytes | None, tmp_path, capsys, monkeypatch) -> tuple[int, str, str]:
    import sys
    import types

    from htsat_hf.commands import listen as cli

    if stdin_bytes is not None:
        (tmp_path / "stdin.raw").write_bytes(stdin_bytes)
        handle = open(tmp_path / "stdin.raw", "rb")  # noqa: SIM115 - ffmpeg reads it as its stdin
        monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=handle))
    try:
        status = cli.main(argv)
    except SystemExit as exit:
        status = exit.code
    finally:
        if stdin_bytes is not None:
            handle.close()
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("flags, message", [
    (["--top-k", "0"], "argument --top-k: expected a whole number >= 1, got 0"),
    (["--stdin-rate", "-16000"], "argument --stdin-rate: expected a whole number >= 1"),
    (["--threads", "0"], "argument --threads: expected a whole number >= 1"),
    (["--lookahead", "-1"], "argument --lookahead: expected a finite number of seconds >= 0"),
    (["--min-gap", "inf"], "argument --min-gap: expected a finite number of seconds >= 0"),
    (["--threshold", "-0.1"], r"argument --threshold: threshold must be in \[0, 1\]"),
    (["--hop", "20"], r"hop_seconds must be > 0 and at most the window"),
    (["--threshold", '{"bark": 0.3}'], r"threshold names unknown labels \['bark'\]"),
])
def test_listen_refuses_bad_options_with_a_usage_error(detector, flags, message, tmp_path, capsys, monkeypatch):
    detector.model.save_pretrained(tmp_path / "model")
    detector.feature_extractor.save_pretrained(tmp_path / "model")
    status, out, err = run_listen(["--model", str(tmp_path / "model"), "--stdin", *flags], None, tmp_path, capsys,
                                  monkeypatch)
    assert status == 2 and out == ""
    assert re_search(message, err) and "Traceback" not in err


@pytest.mark.parametrize("samples, message", [
    (0, "no audio was received: the input is empty"),
    (100, r"The stream has 200 samples \(6.2 ms\), fewer than the 513 that one STFT frame needs"),
])
def test_listen_fails_clearly_on_an_empty_or_too_short_stream(detector, samples, message, tmp_path, capsys,
                                                               monkeypatch):
    detector.model.save_pretrained(tmp_path / "model")
    detector.feature_extractor.save_pretrained(tmp_path / "model")
    pcm = (np.random.default_rng(2).standard_normal(samples) * 0.1).astype(np.float32)
    argv = ["--model", str(tmp_path / "model"), "--stdin", "--stdin-format", "f32le", "--stdin-rate", "16000"]
    status, out, err = run_listen(argv, pcm.tobytes(), tmp_path, capsys, monkeypatch)
    assert status == 1 and out == ""
    assert re_search(message, err)


# ------------------------------------------------------------------ HTSATConfig
@pytest.mark.parametrize("overrides, message", [
    (dict(embed_dim="96"), "embed_dim must be a whole number >= 1, got '96'"),
    (dict(num_heads=4), r"num_heads must be a list with one whole number per stage \(e.g. \[4, 8, 16, 32\]\), got 4"),
    (dict(depths=[1, 1.5, 2, 1]), "depths must be a list with one whole number per stage"),
    (dict(num_mel_bins=None), "num_mel_bins must be a whole number >= 1, got None"),
    (dict(hop_length=0), "hop_length must be a whole number >= 1, got 0"),
    (dict(spec_size=0), "spec_size must be a whole number >= 1, got 0"),
    (dict(clip_seconds="10"), "clip_seconds must be a finite number, got '10'"),
    (dict(f_max=None), "f_max must be a finite number, got None"),
    (dict(long_input_hop_seconds=float("nan")), "long_input_hop_seconds must be a finite number, got nan"),
    (dict(drop_path_rate=1.5), r"drop_path_rate must be in \[0, 1\], got 1.5"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps must be > 0"),
    (dict(qkv_bias="yes"), "qkv_bias must be True or False, got 'yes'"),
    (dict(id2label={0: "tone", 2: "noise"}), r"id2label must number its 2 classes 0..1 .*missing ids \[1\]"),
    (dict(id2label={"0": "tone", "one": "noise"}), "id2label's keys must be class ids"),
    (dict(id2label={0: "tone", 1: None}), r"id2label\[1\] must be a label name"),
    (dict(num_labels=0), "num_labels must be >= 1"),
    (dict(num_mel_bins=128), r"^(?!clip_seconds).*num_mel_bins=128 \(spec_size // num_mel_bins = 2 chunks"),
    (dict(problem_type="multi_label"), r"problem_type must be one of .*'multi_label_classification'.*got 'multi_label'"),
])
def test_config_settings_of_the_wrong_type_raise_naming_the_setting(overrides, message):
    from htsat_hf import HTSATConfig

    with pytest.raises(ValueError, match=message):
        HTSATConfig(**overrides)


def test_config_type_checks_also_guard_later_changes_and_saved_files(tmp_path):
    import json

    from htsat_hf import HTSATConfig

    config = HTSATConfig(id2label={"0": "tone", "1": "noise"})  # JSON's string keys are ids too
    assert config.id2label == {0: "tone", 1: "noise"}
    config.num_heads = 8
    with pytest.raises(ValueError, match="num_heads must be a list"):
        config.validate_architecture()
    HTSATConfig(num_labels=2).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["id2label"] = {"0": "a", "5": "b"}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"missing ids \[1\], ids out of range \[5\]"):
        HTSATConfig.from_pretrained(tmp_path)


def test_the_window_stream_itself_refuses_a_batch_size_below_one(detector):
    """The shared mechanism (the SED pipeline's and the annotator's windows): pending windows were emitted when
    their count reached the batch size, so a size below 1 held every window of the recording (3.45 GB on 3 h)."""
    from htsat_hf.pipeline_htsat import audio_source
    from htsat_hf.time_axis import WindowStream

    source = audio_source(audio(27.0), RATE)  # windows at 0, 5, 10, 15 and 17 s
    stream = WindowStream(detector.model.config, detector.feature_extractor, source)
    with pytest.raises(ValueError, match="window_batch_size must be a whole number >= 1, got 0"):
        next(stream.window_batches(0))
    assert [len(starts) for _, starts in stream.window_batches(2)] == [2, 2, 1]


@pytest.mark.parametrize("flags, message", [
    (["--rows_per_shard", "0"], "argument --rows_per_shard: expected a whole number >= 1, got 0"),
    (["--limit", "-1"], "argument --limit: expected a whole number >= 1, got -1"),
    (["--num_workers", "-1"], "argument --num_workers: expected a whole number >= 0, got -1"),
    (["--top_k", "0"], "argument --top_k: expected a whole number >= 1, got 0"),
    (["--label-mapping", "missing.json"], r"argument --label-mapping: .*missing.json"),
    (["--min-duration", "nan"], r"argument --min-duration: expected a finite number of seconds >= 0"),
])
def test_annotate_refuses_bad_options_before_any_work(flags, message, files, tmp_path, capsys, monkeypatch):
    from htsat_hf.commands import annotate as cli

    monkeypatch.setattr(cli, "input_source", lambda args: pytest.fail("the inputs were read"))
    with pytest.raises(SystemExit) as exit:
        cli.main(["--model_name_or_path", "unused", "--files", files[0], "--output_dir", str(tmp_path / "out"),
                  *flags])
    assert exit.value.code == 2
    assert re_search(message, capsys.readouterr().err)


def test_annotator_and_live_detector_take_a_path_label_mapping_and_refuse_fractions(detector, tmp_path):
    import json
    from pathlib import Path

    from htsat_hf.annotation import Annotator
    from htsat_hf.live.detector import LiveDetector

    labels = list(detector.model.config.id2label.values())
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"first two": labels[:2]}))
    detector.model.save_pretrained(tmp_path / "model")
    detector.feature_extractor.save_pretrained(tmp_path / "model")
    model = str(tmp_path / "model")
    assert Annotator(model, label_mapping=Path(mapping)).label_mapping == {"first two": labels[:2]}
    assert LiveDetector(model, label_mapping=Path(mapping)).labels == ["first two"]
    with pytest.raises(ValueError, match="top_k must be a whole number >= 1, got 2.5"):
        Annotator(model, top_k=2.5)
    with pytest.raises(ValueError, match="window_batch_size must be a whole number >= 1, got '3'"):
        LiveDetector(model, window_batch_size="3")


# ------------------------------------------------------------------ one EventSettings for every entry point
EVENT_FLAGS = ["--threshold", "0.3", "--median-filter", "0.7", "--min-gap", "0.2", "--hysteresis", "0.6", "0.4",
               "--upsample", "linear"]


def expected_event_settings():
    from htsat_hf.sed_postprocessing import EventSettings

    return EventSettings(threshold=0.3, median_filter_seconds=0.7, min_gap_seconds=0.2, hysteresis=(0.6, 0.4),
                         upsample="linear")


class Captured(Exception):
    """Raised by a stand-in for the model object a command builds, carrying the keywords it was given."""


def capture(*args, **kwargs):
    raise Captured(kwargs)


def test_the_event_flags_reach_detect_annotate_and_listen_as_one_event_settings(files, tmp_path, monkeypatch):
    """Each command reads the same flags (`add_event_arguments`) into one `EventSettings` and hands it whole to the
    object that does the work: the SED pipeline, the `Annotator`, the `LiveDetector`."""
    import shutil

    import transformers

    import htsat_hf.annotation.annotator as annotator_module
    import htsat_hf.live.detector as live_module
    from htsat_hf.commands import annotate, detect, listen

    monkeypatch.setattr(transformers, "pipeline", capture)
    monkeypatch.setattr(annotator_module, "Annotator", capture)
    monkeypatch.setattr(live_module, "LiveDetector", capture)
    runs = {
        "detect": lambda: detect.main([files[0], "--model", "unused", *EVENT_FLAGS]),
        "annotate": lambda: annotate.main(["--model_name_or_path", "unused", "--files", files[0], "--output_dir",
                                           str(tmp_path / "out"), "--device", "cpu", *EVENT_FLAGS]),
    }
    if shutil.which("ffprobe") and shutil.which("ffmpeg"):
        runs["listen"] = lambda: listen.main(["--model", "unused", "--input", files[0], *EVENT_FLAGS])
    for name, run in runs.items():
        with pytest.raises(Captured) as captured:
            run()
        keywords = captured.value.args[0]
        assert keywords["event_settings"] == expected_event_settings(), name
        assert not {"threshold", "median_filter_seconds", "hysteresis"} & set(keywords), name  # not spelt out again


def test_pipeline_annotator_and_live_detector_take_one_event_settings(detector, files, tmp_path):
    from htsat_hf.annotation import Annotator
    from htsat_hf.live.detector import LiveDetector
    from htsat_hf.sed_postprocessing import EventSettings

    settings = expected_event_settings()
    folder = tmp_path / "model"
    detector.model.save_pretrained(folder)
    detector.feature_extractor.save_pretrained(folder)
    annotator = Annotator(str(folder), event_settings=settings, device="cpu")
    live = LiveDetector(str(folder), event_settings=settings)
    assert annotator.event_settings == live.event_settings == settings
    # keywords given beside it replace its fields, as the pipeline's do
    assert LiveDetector(str(folder), event_settings=settings, threshold=0.5).event_settings == EventSettings(
        threshold=0.5, median_filter_seconds=0.7, min_gap_seconds=0.2, hysteresis=(0.6, 0.4), upsample="linear")
    low = pipeline("sound-event-detection", model=str(folder), threshold=0.0)
    clip = audio(12.0)
    spelt_out = low(clip, **{k: v for k, v in settings.keywords().items() if v is not None})["events"]
    assert low(clip, event_settings=settings)["events"] == spelt_out
    # a call's settings object replaces the constructor's whole: its median filter and hysteresis left out are off
    built_with = pipeline("sound-event-detection", model=str(folder), event_settings=settings)
    plain = EventSettings(threshold=0.05)
    fresh = pipeline("sound-event-detection", model=str(folder), event_settings=plain)
    assert built_with(clip, event_settings=plain)["events"] == fresh(clip)["events"]
    assert built_with(clip, event_settings=plain)["events"] != built_with(clip)["events"]
    with pytest.raises(TypeError, match="event_settings must be an EventSettings"):
        low(clip, event_settings={"threshold": 0.3})
    with pytest.raises(ValueError, match="threshold must be in"):
        EventSettings(threshold=1.5)
