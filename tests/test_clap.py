"""CLAP with an HTS-AT audio tower (#31, stage 1): loading Transformers' unfused ClapModel layout, parity with
Transformers' CLAP up to one window, windows combined for longer inputs, per-step similarity, and phrases through the
SED pipeline's own post-processing. Everything is built offline: a small random ClapConfig and a byte-level BPE
tokenizer trained here, wrapped as Transformers' RobertaTokenizer (what ClapProcessor uses)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    RobertaTokenizer,
    ZeroShotAudioClassificationPipeline,
    pipeline,
)

from conftest import definition_only
from htsat_hf import HTSATClapConfig, HTSATClapFeatureExtractor, HTSATClapModel, text_query_model
from htsat_hf.time_axis import stitch_on_grid
from htsat_hf.scores import frame_scores, with_window_clip_logits
from htsat_hf.sed_postprocessing import frames_to_events

RATE = 48000
TOLERANCE = 1e-5
LABELS = ["a dog barking", "a siren", "rain on a roof"]
SENTENCES = [
    "This is a sound of a dog barking.", "This is a sound of a siren.", "This is a sound of rain on a roof.",
    "a cat meowing", "silence", "background noise", "birds singing in the morning",
]


def build_tokenizer(tmp_path) -> RobertaTokenizer:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    bpe.save_model(str(tmp_path))
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (tmp_path / "merges.txt").read_text().splitlines()[1:] if line.strip()]
    return RobertaTokenizer(vocab=vocab, merges=merges)


def build_clap(vocab_size: int, fused: bool = False) -> ClapModel:
    torch.manual_seed(0)
    config = ClapConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=64),
        audio_config=dict(patch_embeds_hidden_size=8, depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 4, 8],
                          hidden_size=64, enable_fusion=fused, fusion_type="aff_2d" if fused else None),
        projection_dim=64,
    )
    clap = ClapModel(config).eval()
    with torch.no_grad():  # CLAP initialises these to constants: random values test that they are carried over
        for name, parameter in clap.named_parameters():
            if "relative_position_bias_table" in name or "batch_norm" in name or "logit_scale" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
        batch_norm = clap.audio_model.audio_encoder.batch_norm
        batch_norm.running_mean.normal_()
        batch_norm.running_var.uniform_(0.5, 2.0)
    return clap


@pytest.fixture(scope="module")
def clap_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clap")
    (tmp / "tokenizer").mkdir()
    tokenizer = build_tokenizer(tmp / "tokenizer")
    clap = build_clap(len(tokenizer))
    clap_extractor = ClapFeatureExtractor(truncation="rand_trunc", frequency_min=50, frequency_max=14000)
    model = HTSATClapModel.from_clap(clap, clap_extractor)
    extractor = HTSATClapFeatureExtractor.from_clap_feature_extractor(clap_extractor)
    folder = tmp / "htsat_clap"
    model.save_pretrained(folder)
    extractor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return dict(tokenizer=tokenizer, clap=clap, clap_extractor=clap_extractor, model=model, extractor=extractor,
                folder=folder, tmp=tmp)


def noise(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * RATE)) * 0.1).astype(np.float32)


def scores_of(result: list[dict]) -> dict[str, float]:
    return {entry["label"]: entry["score"] for entry in result}


# --------------------------------------------------------------------------------------------------- loading
def test_config_and_weights_come_from_clap(clap_setup):
    model, clap = clap_setup["model"], clap_setup["clap"]
    audio = model.config.audio_config
    assert (audio.sampling_rate, audio.hop_length, audio.n_fft, audio.f_min, audio.f_max) == (48000, 480, 1024, 50, 14000)
    assert (audio.embed_dim, audio.depths, audio.num_heads, audio.spec_size) == (8, [1, 1, 1, 1], [1, 2, 4, 8], 256)
    ours = model.state_dict()
    for name, tensor in clap.state_dict().items():
        if not name.startswith("audio_model."):
            assert torch.equal(ours[name], tensor), name
    assert torch.equal(model.logit_scale_a, clap.logit_scale_a) and torch.equal(model.logit_scale_t, clap.logit_scale_t)


def test_fused_variant_is_refused(clap_setup):
    fused = build_clap(len(clap_setup["tokenizer"]), fused=True)
    with pytest.raises(ValueError, match="fused CLAP checkpoint.*fusion branch.*mel_conv2d"):
        HTSATClapModel.from_clap(fused)
    state = dict(clap_setup["clap"].state_dict())
    state["audio_model.audio_encoder.fusion_model.local_att.0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="fusion branch.*not supported"):
        HTSATClapModel.from_clap(state, clap_config=clap_setup["clap"].config)
    with pytest.raises(ValueError, match="truncation='fusion'"):
        HTSATClapFeatureExtractor.from_clap_feature_extractor(ClapFeatureExtractor())  # the fused default
    with pytest.raises(ValueError, match="clap_config"):
        HTSATClapModel.from_clap(clap_setup["clap"].state_dict())


def test_saved_folder_loads_through_auto_classes(clap_setup):
    folder = clap_setup["folder"]
    assert isinstance(AutoConfig.from_pretrained(folder), HTSATClapConfig)
    loaded = AutoModel.from_pretrained(folder).eval()
    assert isinstance(loaded, HTSATClapModel) and not any(loaded.loading_info.values())
    assert isinstance(AutoFeatureExtractor.from_pretrained(folder), HTSATClapFeatureExtractor)
    features = clap_setup["extractor"](noise(2, 3), sampling_rate=RATE, return_tensors="pt")["input_features"]
    with torch.no_grad():
        expected = clap_setup["model"].get_audio_features(features).pooler_output
        assert torch.equal(loaded.get_audio_features(features).pooler_output, expected)


REMOTE = textwrap.dedent(
    """
    import json, sys
    sys.modules["htsat_hf"] = None  # the package is not available here
    import torch
    from transformers import AutoFeatureExtractor, AutoModel, pipeline
    folder = sys.argv[1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
    audio = torch.load(sys.argv[2]).numpy()
    features = extractor(audio, sampling_rate=48000, return_tensors="pt")["input_features"]
    with torch.no_grad():
        embeds = model.get_audio_features(features).pooler_output
    zero_shot = pipeline("zero-shot-audio-classification", model=folder, trust_remote_code=True)
    print(json.dumps({"classes": [type(model).__name__, type(extractor).__name__],
                      "modules": [type(model).__module__, type(extractor).__module__], "embeds": embeds.tolist(),
                      "zero_shot": zero_shot(audio, candidate_labels=["a dog barking", "a siren", "rain on a roof"])}))
    """
)


def test_saved_folder_loads_as_remote_code(clap_setup):
    tmp, folder = clap_setup["tmp"], clap_setup["folder"]
    audio = noise(3, 4)
    torch.save(torch.from_numpy(audio), tmp / "audio.pt")
    (tmp / "remote.py").write_text(REMOTE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp / "modules")}
    result = subprocess.run([sys.executable, str(tmp / "remote.py"), str(folder), str(tmp / "audio.pt")],
                            capture_output=True, text=True, env=env, cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["classes"] == ["HTSATClapModel", "HTSATClapFeatureExtractor"]
    assert all(module.startswith("transformers_modules") for module in report["modules"])
    features = clap_setup["extractor"](audio, sampling_rate=RATE, return_tensors="pt")["input_features"]
    with torch.no_grad(), definition_only(clap_setup["model"]):
        expected = clap_setup["model"].get_audio_features(features).pooler_output
    assert torch.allclose(torch.tensor(report["embeds"]), expected, atol=1e-6)
    # Transformers' own zero-shot pipeline runs the remote model (inputs up to one window give CLAP's scores)
    zero_shot = pipeline("zero-shot-audio-classification", model=str(folder))
    with definition_only(zero_shot.model):
        ours = zero_shot(audio, candidate_labels=LABELS)
    assert [entry["label"] for entry in report["zero_shot"]] == [entry["label"] for entry in ours]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(report["zero_shot"], ours)) < 1e-6


# ----------------------------------------------------------------------------------------- front end and fold
@pytest.mark.parametrize("seconds", [0.7, 3.3, 10.0])
def test_features_equal_clap_feature_extractor(clap_setup, seconds):
    audio = noise(seconds, 5)
    theirs = clap_setup["clap_extractor"](audio, sampling_rate=RATE, return_tensors="pt")["input_features"][:, 0]
    ours = clap_setup["extractor"](audio, sampling_rate=RATE, return_tensors="pt")["input_features"]
    assert ours.shape == theirs.shape == (1, 1001, 64)
    assert (ours - theirs.float()).abs().max() < 1e-3  # dB; float32 STFT rounding (CLAP stores complex64)
    assert (theirs[0, -5:] == -100).all() == (seconds in (0.7, 3.3))  # repeatpad: zeros after the repetitions


def test_fold_equals_reshape_mel2img(clap_setup):
    encoder = clap_setup["clap"].audio_model.audio_encoder
    features = torch.randn(2, 1001, 64) * 10
    with torch.no_grad():
        normalized = encoder.batch_norm(features[:, None].transpose(1, 3)).transpose(1, 3)
        theirs = encoder.reshape_mel2img(normalized)
        ours = clap_setup["model"].audio_model.window_images(features)
    assert ours.shape == theirs.shape == (2, 1, 256, 256)
    assert (ours - theirs).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------- exactness
def test_audio_and_text_features_equal_transformers_clap(clap_setup):
    model, clap, tokenizer = clap_setup["model"], clap_setup["clap"], clap_setup["tokenizer"]
    audios = [noise(s, 10 + i) for i, s in enumerate((1.0, 4.5, 10.0))]
    theirs_in = clap_setup["clap_extractor"](audios, sampling_rate=RATE, return_tensors="pt")
    ours_in = clap_setup["extractor"](audios, sampling_rate=RATE, return_tensors="pt")
    texts = tokenizer([f"This is a sound of {label}." for label in LABELS], padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = clap.get_audio_features(input_features=theirs_in["input_features"].float(),
                                         is_longer=theirs_in["is_longer"]).pooler_output
        ours = model.get_audio_features(ours_in["input_features"]).pooler_output
        theirs_text = clap.get_text_features(**texts).pooler_output
        ours_text = model.get_text_features(**texts).pooler_output
        theirs_logits = clap(**texts, input_features=theirs_in["input_features"].float()).logits_per_audio
        ours_logits = model(**texts, input_features=ours_in["input_features"]).logits_per_audio
        no_projection = copy.deepcopy(model)
        no_projection.audio_projection = nn.Identity()
        unprojected = no_projection.get_audio_features(ours_in["input_features"]).pooler_output
    print(f"max |audio embeds diff| {(ours - theirs).abs().max():.2e}, text {(ours_text - theirs_text).abs().max():.2e}"
          f", logits_per_audio {(ours_logits - theirs_logits).abs().max():.2e}")
    assert (ours - theirs).abs().max() < TOLERANCE
    assert (ours_text - theirs_text).abs().max() < TOLERANCE
    assert (ours_logits - theirs_logits).abs().max() < TOLERANCE * 10  # logits are cosines times exp(scale) ~ 15
    assert (unprojected - theirs).abs().max() > 100 * TOLERANCE  # leaving the projection out is caught


def test_zero_shot_pipeline_equals_transformers(clap_setup):
    reference = ZeroShotAudioClassificationPipeline(model=clap_setup["clap"], feature_extractor=clap_setup["clap_extractor"],
                                                    tokenizer=clap_setup["tokenizer"])
    ours = pipeline("zero-shot-audio-classification", model=str(clap_setup["folder"]))
    unscaled_model = copy.deepcopy(ours.model)
    with torch.no_grad():
        unscaled_model.logit_scale_a.zero_()
    unscaled = pipeline("zero-shot-audio-classification", model=unscaled_model, feature_extractor=ours.feature_extractor,
                        tokenizer=ours.tokenizer)
    worst = 0.0
    for seconds, seed in ((2.0, 20), (7.5, 21), (10.0, 22)):
        audio = noise(seconds, seed)
        expected = reference(audio, candidate_labels=LABELS, hypothesis_template="This is a sound of {}.")
        result = ours(audio, candidate_labels=LABELS, hypothesis_template="This is a sound of {}.")
        assert [entry["label"] for entry in result] == [entry["label"] for entry in expected]
        assert set(result[0]) == {"score", "label"}
        difference = max(abs(scores_of(result)[label] - scores_of(expected)[label]) for label in LABELS)
        worst = max(worst, difference)
        assert difference < TOLERANCE
        wrong = scores_of(unscaled(audio, candidate_labels=LABELS))
        assert max(abs(wrong[label] - scores_of(expected)[label]) for label in LABELS) > 100 * TOLERANCE
    print(f"max |zero-shot score diff| {worst:.2e}")


# ------------------------------------------------------------------------------------------------ any length
def test_long_input_combines_window_embeddings(clap_setup):
    model, extractor, tokenizer = clap_setup["model"], clap_setup["extractor"], clap_setup["tokenizer"]
    audio = noise(23.0, 30)
    features = extractor(audio, sampling_rate=RATE, return_tensors="pt")["input_features"]
    starts, window_frames = model.audio_model.window_layout(features.shape[1])
    assert len(starts) == 4 and window_frames == 1001
    texts = tokenizer([f"This is a sound of {label}." for label in LABELS], padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = torch.stack([model.audio_model(features[:, s : s + window_frames]).pooler_output for s in starts])
        expected_embeds = F.normalize(model.audio_projection(pooled.mean(dim=0)), dim=-1)
        text_embeds = model.get_text_features(**texts).pooler_output
        expected = (expected_embeds @ text_embeds.t() * model.logit_scale_a.exp()).softmax(dim=-1)[0]
        assert (model.get_audio_features(features).pooler_output - expected_embeds).abs().max() < 1e-6
    zero_shot = pipeline("zero-shot-audio-classification", model=str(clap_setup["folder"]))
    result = scores_of(zero_shot(audio, candidate_labels=LABELS))
    assert max(abs(result[label] - float(expected[i])) for i, label in enumerate(LABELS)) < TOLERANCE
    # a path to the file gives the same answer as the array
    import soundfile as sf

    sf.write(clap_setup["tmp"] / "long.wav", audio, RATE, subtype="FLOAT")
    from_file = scores_of(zero_shot(str(clap_setup["tmp"] / "long.wav"), candidate_labels=LABELS))
    assert max(abs(from_file[label] - result[label]) for label in LABELS) < 1e-6


# ------------------------------------------------------------------------------------------------------ steps
def test_step_embeddings_are_clap_token_map_columns_and_average_to_pooled(clap_setup):
    model, clap, extractor = clap_setup["model"], clap_setup["clap"], clap_setup["extractor"]
    features = extractor([noise(10.0, 40), noise(3.0, 41)], sampling_rate=RATE, return_tensors="pt")["input_features"]
    with torch.no_grad():
        tokens, _, _ = model.encode_audio(features)
        steps = model.step_embeddings(tokens[:, 0])
        clap_out = clap.audio_model(input_features=features[:, None])
    assert steps.shape == (2, model.config.audio_config.token_steps, 64)
    # CLAP's last_hidden_state is the token map regrouped as (hidden, frequency tokens, time steps)
    clap_steps = clap_out.last_hidden_state.mean(dim=2).transpose(1, 2)
    assert (steps - clap_steps).abs().max() < TOLERANCE
    assert (steps.mean(dim=1) - tokens[:, 0].mean(dim=1)).abs().max() < 1e-6  # the identity, exactly in float
    assert (steps.mean(dim=1) - clap_out.pooler_output).abs().max() < TOLERANCE


def test_step_logits_of_long_input_are_stitched_window_steps(clap_setup):
    model, extractor, tokenizer = clap_setup["model"], clap_setup["extractor"], clap_setup["tokenizer"]
    features = extractor(noise(17.0, 50), sampling_rate=RATE, return_tensors="pt")["input_features"]
    texts = tokenizer(LABELS, padding=True, return_tensors="pt")
    with torch.no_grad():
        text_embeds = model.get_text_features(**texts).pooler_output
        output = model.step_similarity(features, text_embeds)
        starts, window_frames = model.audio_model.window_layout(features.shape[1])
        per_window = torch.stack([model.step_similarity(features[:, s : s + window_frames], text_embeds).step_logits
                                  for s in starts], dim=1)
    config = model.config.audio_config
    step = model.frame_step_seconds(features.shape[1])
    start_steps = torch.tensor(starts, dtype=torch.float64) * config.hop_length / config.sampling_rate / step
    expected = stitch_on_grid(per_window, start_steps, model.total_steps(features.shape[1]))
    assert output.step_logits.shape == expected.shape == (1, model.total_steps(features.shape[1]), 3)
    assert (output.step_logits - expected).abs().max() < 1e-5
    assert output.window_logits.shape == (1, len(starts), 3)


def hand_step_logits(model, features, text_embeds):
    """Step logits of one window computed from the definitions, not from step_similarity."""
    tokens = model.audio_model(features).last_hidden_state  # (batch, 64 tokens, hidden), one window
    grid, ratio = 8, 4
    token_map = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, ratio, grid // ratio, grid)  # rows = chunk, group
    steps = token_map.mean(dim=3).flatten(2).transpose(1, 2)  # time = chunk * 8 + column
    scale = model.logit_scale_a.exp()
    step_logits = F.normalize(model.audio_projection(steps), dim=-1) @ text_embeds.t() * scale
    clip_logits = F.normalize(model.audio_projection(tokens.mean(dim=1)), dim=-1) @ text_embeds.t() * scale
    return step_logits, clip_logits


def test_sed_pipeline_detects_phrases_with_the_same_post_processing(clap_setup):
    model, extractor, tokenizer = clap_setup["model"], clap_setup["extractor"], clap_setup["tokenizer"]
    audio = noise(10.0, 60)
    audio[: 4 * RATE] = 0.0  # silence, then noise: the phrases' scores change over time
    detector = pipeline("sound-event-detection", model=str(clap_setup["folder"]), candidate_labels=LABELS)
    texts = tokenizer([f"This is a sound of {label}." for label in LABELS], padding=True, return_tensors="pt")
    features = extractor(audio, sampling_rate=RATE, padding=False, return_tensors="pt")["input_features"]
    with torch.no_grad():
        text_embeds = model.get_text_features(**texts).pooler_output
        step_logits, clip_logits = hand_step_logits(model, features, text_embeds)
    stitched = with_window_clip_logits(step_logits, "single_label_classification", clip_logits)[0]
    expected_scores = frame_scores(stitched, "single_label_classification").numpy()
    threshold = float(np.median(expected_scores))
    result = detector(audio, threshold=threshold, min_duration_seconds=0.5, return_frame_scores=True)
    assert result["labels"] == LABELS
    assert np.abs(result["frame_scores"] - expected_scores).max() < 1e-5
    step = 10.0 / 32
    expected_events = frames_to_events(result["frame_scores"], step, LABELS, threshold=threshold,
                                       min_duration_seconds=0.5, duration_seconds=10.0)
    assert result["events"] == expected_events and expected_events
    streamed = detector(audio, threshold=threshold, min_duration_seconds=0.5)["events"]
    assert [(e["label"], e["onset"], e["offset"]) for e in streamed] == [
        (e["label"], e["onset"], e["offset"]) for e in expected_events]


def test_sigmoid_calibration_with_background_phrase_on_long_input(clap_setup):
    model, extractor, tokenizer = clap_setup["model"], clap_setup["extractor"], clap_setup["tokenizer"]
    audio = noise(17.0, 70)
    audio[6 * RATE : 11 * RATE] = 0.0
    detector = pipeline("sound-event-detection", model=str(clap_setup["folder"]))
    with pytest.raises(ValueError, match="candidate_labels"):
        detector(audio)
    result = detector(audio, candidate_labels=LABELS[:2], calibration="sigmoid", background_label="silence",
                      threshold=0.5, return_frame_scores=True)
    query = text_query_model(model, LABELS[:2], tokenizer, calibration="sigmoid", background="silence")
    assert query.config.id2label == {0: LABELS[0], 1: LABELS[1]}
    assert query.config.problem_type == "multi_label_classification"
    features = extractor(audio, sampling_rate=RATE, return_tensors="pt")["input_features"]
    texts = tokenizer([f"This is a sound of {p}." for p in LABELS[:2] + ["silence"]], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model.step_similarity(features, model.get_text_features(**texts).pooler_output).step_logits[0]
    expected = torch.sigmoid((logits[:, :2] - logits[:, 2:]).double()).float().numpy()
    assert result["labels"] == LABELS[:2]
    assert result["frame_scores"].shape == expected.shape
    assert np.abs(result["frame_scores"] - expected).max() < 1e-5
    step = model.frame_step_seconds(features.shape[1])
    assert result["events"] == frames_to_events(result["frame_scores"], step, LABELS[:2], threshold=0.5,
                                                duration_seconds=17.0)
    # the call's phrases held for that call only
    with pytest.raises(ValueError, match="candidate_labels"):
        detector(audio)


def test_text_query_arguments_are_checked(clap_setup):
    model, tokenizer = clap_setup["model"], clap_setup["tokenizer"]
    with pytest.raises(ValueError, match="calibration"):
        text_query_model(model, LABELS, tokenizer, calibration="temperature")
    with pytest.raises(ValueError, match="distinct"):
        text_query_model(model, ["a", "a"], tokenizer)
    with pytest.raises(ValueError, match="hypothesis_template"):
        text_query_model(model, LABELS, tokenizer, hypothesis_template="no slot")
    softmax = text_query_model(model, LABELS, tokenizer, background="silence")
    assert softmax.config.id2label[3] == "silence" and softmax.config.problem_type == "single_label_classification"


def test_clap_folder_converts(clap_setup, tmp_path):
    from htsat_hf.commands.cli import main

    source = tmp_path / "clap"
    clap_setup["clap"].save_pretrained(source)
    clap_setup["clap_extractor"].save_pretrained(source)
    clap_setup["tokenizer"].save_pretrained(source)
    assert main(["convert-clap", str(source), str(tmp_path / "out")]) == 0
    zero_shot = pipeline("zero-shot-audio-classification", model=str(tmp_path / "out"))
    expected = pipeline("zero-shot-audio-classification", model=str(clap_setup["folder"]))
    audio = noise(5.0, 80)
    assert zero_shot(audio, candidate_labels=LABELS) == expected(audio, candidate_labels=LABELS)


def test_planted_phrase_is_found_where_it_was_planted(clap_setup):
    """A phrase whose text embedding is planted as the mean projected step embedding of a 3-kHz tone (7-9 s, after
    silence and noise) is detected there, against a background phrase planted on the noise."""
    model, extractor = clap_setup["model"], clap_setup["extractor"]
    audio = noise(10.0, 90)
    audio[: 4 * RATE] = 0.0
    audio[7 * RATE : 9 * RATE] = 0.5 * np.sin(2 * np.pi * 3000 * np.arange(2 * RATE) / RATE)
    features = extractor(audio, sampling_rate=RATE, padding=False, return_tensors="pt")["input_features"]
    with torch.no_grad():
        tokens, _, _ = model.encode_audio(features)
        steps = model.project_audio(model.step_embeddings(tokens[:, 0]))[0]
    onsets = np.arange(32) * 10.0 / 32
    tone = torch.tensor((onsets >= 7.0) & (onsets + 10.0 / 32 <= 9.0))
    noisy = torch.tensor(onsets >= 4.0) & ~tone
    detector = pipeline("sound-event-detection", model=str(clap_setup["folder"]), candidate_labels=["a tone"],
                        background_label="noise", calibration="sigmoid")
    detector.model.text_embeds = F.normalize(steps[tone].mean(dim=0), dim=-1)[None]
    detector.model.background_embed = F.normalize(steps[noisy].mean(dim=0), dim=-1)[None]
    with torch.no_grad():
        detector.model.clap.logit_scale_a.fill_(np.log(100.0))  # a trained CLAP's scale is of this order
    events = detector(audio, threshold=0.7)["events"]
    print(f"planted tone 7-9 s, detected {events}")
    assert [event["label"] for event in events] == ["a tone"]
    assert abs(events[0]["onset"] - 7.0) <= 0.5 and abs(events[0]["offset"] - 9.0) <= 0.5
