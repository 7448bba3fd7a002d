"""Behaviour of the HTS-AT model classes: shapes, heads, long inputs, attention paths, saving, training hooks."""

from __future__ import annotations

import pytest
import torch

from htsat_hf import HTSATConfig, HTSATForAudioClassification, HTSATForSoundEventDetection, HTSATModel
from htsat_hf.time_axis import StepStitcher, window_starts

TINY = dict(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], num_labels=6)


def tiny_config(**overrides) -> HTSATConfig:
    return HTSATConfig(**{**TINY, **overrides})


def features(batch: int = 2, frames: int = 1001, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, frames, 64, generator=torch.Generator().manual_seed(seed)) * 10 - 40


@pytest.fixture(scope="module")
def sed_model() -> HTSATForSoundEventDetection:
    torch.manual_seed(0)
    return HTSATForSoundEventDetection(tiny_config()).eval()


# ------------------------------------------------------------------------------------------------- config
def test_paper_defaults():
    config = HTSATConfig()
    assert (config.sampling_rate, config.n_fft, config.hop_length, config.num_mel_bins) == (32000, 1024, 320, 64)
    assert (config.f_min, config.f_max, config.spec_size, config.patch_size, config.window_size) == (50, 14000, 256, 4, 8)
    assert config.hidden_sizes == [96, 192, 384, 768] and config.depths == [2, 2, 6, 2]
    assert config.num_heads == [4, 8, 16, 32] and config.drop_path_rate == 0.1 and config.qkv_bias
    assert config.num_labels == 527 and config.problem_type == "multi_label_classification"
    assert config.use_token_semantic_head and config.token_steps == 32 and config.image_frames == 1024


def test_full_size_model_has_the_papers_parameter_count():
    with torch.device("meta"):
        model = HTSATForAudioClassification(HTSATConfig())
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert 27 < millions < 32  # the paper: 31M with its linear head; the token-semantic conv replaces it


@pytest.mark.parametrize(
    "overrides, setting",
    [
        (dict(num_heads=[3, 2, 4, 8]), "num_heads\\[0\\]=3"),
        (dict(window_size=6), "window_size=6"),
        (dict(num_mel_bins=60), "num_mel_bins=60"),
        (dict(depths=[1, 1, 1], num_heads=[1, 2, 4, 8]), "depths has 3 stages"),
        (dict(patch_size=3, patch_stride=4), "patch_size=3"),
    ],
)
def test_incompatible_settings_raise_naming_the_setting(overrides, setting):
    with pytest.raises(ValueError, match=setting):
        tiny_config(**overrides)


# ------------------------------------------------------------------------------------------------- outputs
def test_outputs_shapes_and_clip_logits_are_mean_of_frame_logits(sed_model):
    with torch.no_grad():
        out = sed_model(features())
    assert out.logits.shape == (2, 6) and out.frame_logits.shape == (2, 32, 6)
    torch.testing.assert_close(out.logits, out.frame_logits.mean(dim=1))
    assert out.pooler_output.shape == (2, 64)


def test_backbone_outputs_hidden_states_and_attentions():
    model = HTSATModel(tiny_config()).eval()
    with torch.no_grad():
        out = model(features(1), output_hidden_states=True, output_attentions=True)
    assert out.last_hidden_state.shape == (1, 64, 64)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(1))
    assert [h.shape[1] for h in out.hidden_states] == [4096, 1024, 256, 64, 64]
    assert len(out.attentions) == 4 and out.attentions[0].shape == (1, 64, 1, 64, 64)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(1, 64, 1, 64))
    assert len(model(features(1), return_dict=False)) == 2


def test_sdpa_and_eager_attention_agree():
    torch.manual_seed(1)
    config = tiny_config()
    sdpa = HTSATForSoundEventDetection(config).eval()
    eager_config = tiny_config()
    eager_config._attn_implementation = "eager"
    eager = HTSATForSoundEventDetection(eager_config).eval()
    eager.load_state_dict(sdpa.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(sdpa(features()).frame_logits, eager(features()).frame_logits, atol=1e-5, rtol=1e-5)


def test_pooled_head_ablation_has_no_frame_logits():
    model = HTSATForAudioClassification(tiny_config(use_token_semantic_head=False)).eval()
    assert isinstance(model.classifier.dense, torch.nn.Linear)
    with torch.no_grad():
        assert model(features()).logits.shape == (2, 6)
    with pytest.raises(ValueError, match="token-semantic head"):
        HTSATForSoundEventDetection(tiny_config(use_token_semantic_head=False))


def test_both_heads_share_weights(sed_model, tmp_path):
    sed_model.save_pretrained(tmp_path)
    classifier = HTSATForAudioClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(classifier(features()).logits, sed_model(features()).logits)


def test_bad_feature_shape_is_a_clear_error(sed_model):
    with pytest.raises(ValueError, match="input_features must have shape \\(batch, frames, 64\\)"):
        sed_model(torch.zeros(1, 1001, 128))


# --------------------------------------------------------------------------------------------- long inputs
def test_window_starts_cover_every_frame():
    assert window_starts(1001, 1001, 500) == [0]
    starts = window_starts(3001, 1001, 500)
    assert starts == [0, 500, 1000, 1500, 2000]
    odd = window_starts(2345, 1001, 500)
    assert odd[-1] + 1001 == 2345 and all(b - a <= 500 for a, b in zip(odd, odd[1:]))


def test_stitcher_places_an_event_crossing_a_window_boundary():
    """Two windows of 4 steps (1 s each) overlapping by 2; an event at 2.5-4.5 s seen by both stays one block."""
    timeline = torch.tensor([0, 0, 1, 1, 1, 0], dtype=torch.float32)  # steps 2, 3, 4 active
    stitcher = StepStitcher(total_steps=6, step_seconds=1.0, num_labels=1)
    stitcher.add(torch.stack([timeline[0:4], timeline[2:6]]).unsqueeze(-1), [0.0, 2.0])
    torch.testing.assert_close(stitcher.result().squeeze(-1), timeline)


def test_stitcher_weights_off_grid_windows_by_overlap():
    stitcher = StepStitcher(total_steps=3, step_seconds=1.0, num_labels=1)
    stitcher.add(torch.tensor([[[2.0], [2.0]]]), [0.0])  # covers 0-2 s
    stitcher.add(torch.tensor([[[4.0], [4.0]]]), [0.5])  # covers 0.5-2.5 s
    result = stitcher.result().squeeze(-1)
    assert result[0].item() == pytest.approx((2 * 1 + 4 * 0.5) / 1.5)
    assert result[2].item() == pytest.approx(4.0)  # only the second window reaches past 2 s


def test_growing_stitcher_equals_one_of_known_length():
    """A stream's length is known only at its end: the growing grid (batches added as they come, past its initial
    size) must give what a stitcher of the final length gives, including dropping steps past the end."""
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(700, 8, 3, generator=generator)
    starts = [i * 3.0 + 0.25 * (i % 3) for i in range(700)]  # 2100 s, off-grid windows
    known = StepStitcher(total_steps=2100, step_seconds=1.0, num_labels=3)
    known.add(values, starts)
    growing = StepStitcher(total_steps=None, step_seconds=1.0, num_labels=3)
    for first in range(0, 700, 64):
        growing.add(values[first : first + 64], starts[first : first + 64])
    assert growing.sums.shape[0] > 2100  # it grew past its initial 1025 rows
    torch.testing.assert_close(growing.result(2100), known.result())
    with pytest.raises(ValueError, match="final number of steps"):
        growing.result()


def test_long_input_keeps_every_step_of_audio(sed_model):
    """30 s of features: 96 steps (3.2 per second), each window's steps land at their own time."""
    long = features(1, 3001)
    with torch.no_grad():
        out = sed_model(long)
        first_window = sed_model(long[:, :1001]).frame_logits
        last_window = sed_model(long[:, 2000:]).frame_logits
    assert out.frame_logits.shape == (1, 96, 6)
    assert sed_model.frame_step_seconds(3001) == pytest.approx(0.3125)
    # steps only one window covers equal that window's output
    torch.testing.assert_close(out.frame_logits[:, :16], first_window[:, :16], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.frame_logits[:, -16:], last_window[:, -16:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, out.frame_logits.mean(1))


def test_long_input_event_changes_scores_only_where_it_is(sed_model):
    """A change confined to 22-24 s moves the late steps; early steps, covered only by unaffected windows, stay."""
    base = features(1, 3001)
    changed = base.clone()
    changed[:, 2200:2400] += 30.0
    with torch.no_grad():
        a, b = sed_model(base).frame_logits, sed_model(changed).frame_logits
    assert torch.allclose(a[:, :48], b[:, :48])  # 0-15 s: windows 0-5 s .. 10-20 s ignore 22 s
    assert not torch.allclose(a[:, 64:80], b[:, 64:80])


# ------------------------------------------------------------------------------------------------- losses
def test_multi_label_and_single_label_losses():
    torch.manual_seed(0)
    multi = HTSATForAudioClassification(tiny_config()).eval()
    targets = torch.zeros(2, 6)
    targets[0, 1] = 1
    out = multi(features(), labels=targets)
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, targets))
    single = HTSATForAudioClassification(tiny_config(problem_type="single_label_classification")).eval()
    hard = single(features(), labels=torch.tensor([1, 4]))
    torch.testing.assert_close(hard.loss, torch.nn.functional.cross_entropy(hard.logits, torch.tensor([1, 4])))
    soft = single(features(), labels=torch.nn.functional.one_hot(torch.tensor([1, 4]), 6).float())
    torch.testing.assert_close(soft.loss, hard.loss)
    assert HTSATForAudioClassification.accepts_loss_kwargs is False


def test_frame_labels_add_a_frame_level_loss(sed_model):
    frame_labels = torch.zeros(2, 32, 6)
    frame_labels[:, 10:20, 2] = 1
    clip = frame_labels.amax(1)
    out = sed_model(features(), labels=clip, frame_labels=frame_labels)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, clip) + (
        torch.nn.functional.binary_cross_entropy_with_logits(out.frame_logits, frame_labels)
    )
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="frame_labels has shape"):
        sed_model(features(), frame_labels=torch.zeros(2, 31, 6))


def test_frame_labels_with_an_input_the_model_would_crop_are_refused():
    """In training, inputs longer than one image are randomly cropped inside the model; frame targets built for the
    whole input would silently point at the wrong steps."""
    model = HTSATForSoundEventDetection(tiny_config()).train()
    with pytest.raises(ValueError, match="randomly cropped"):
        model(features(frames=1400), frame_labels=torch.zeros(2, 32, 6))
    model.eval()  # in inference long inputs are windowed and stitched, so the check does not apply
    with torch.no_grad():
        out = model(features(frames=1400))
    with pytest.raises(ValueError, match="frame_labels has shape"):
        model(features(frames=1400), frame_labels=torch.zeros(2, 32, 6))
    assert out.frame_logits.shape[1] > 32


# ----------------------------------------------------------------------------------------------- training
def test_training_mode_augments_and_mixup_mixes_the_batch():
    torch.manual_seed(0)
    model = HTSATForAudioClassification(tiny_config(drop_path_rate=0.0)).eval()
    x = features()
    normalized = model.htsat.normalize_features(x)
    lam = torch.tensor([0.7, 0.3])
    mixed = model.htsat.normalize_features(x, mixup_lambda=lam)
    torch.testing.assert_close(mixed[0], 0.7 * normalized[0] + 0.3 * normalized[1])
    model.train()
    augmented = model.htsat.normalize_features(x)
    zero_time_rows = (augmented[:, 0] == 0).all(dim=-1).sum(dim=-1)
    assert (zero_time_rows > 0).any()  # SpecAugment zeroed whole frames
    model.config.spec_augment = False
    assert not (model.htsat.normalize_features(x)[:, 0] == 0).all(dim=-1).any()


def test_training_crops_long_inputs_and_gradient_checkpointing_matches():
    torch.manual_seed(0)
    model = HTSATForAudioClassification(tiny_config(drop_path_rate=0.0, spec_augment=False))
    model.train()
    labels = torch.zeros(2, 6)
    x = features(2, 1024)
    loss = model(x, labels=labels).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(x, labels=labels).loss.backward()
    for before, after in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(before, after)
    assert model(features(2, 2000), labels=labels).logits.shape == (2, 6)  # random 1024-frame crop


def test_freeze_feature_encoder():
    model = HTSATForAudioClassification(tiny_config())
    model.freeze_feature_encoder()
    assert not any(p.requires_grad for p in model.htsat.patch_embed.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())


# ---------------------------------------------------------------------------------------------- save / load
def test_save_and_load_round_trip_is_exact(sed_model, tmp_path):
    sed_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = HTSATForSoundEventDetection.from_pretrained(tmp_path).eval()
    for name, buffer in sed_model.named_buffers():  # non-persistent buffers rebuilt, not left as meta garbage
        torch.testing.assert_close(dict(reloaded.named_buffers())[name], buffer, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(features()).frame_logits, sed_model(features()).frame_logits, rtol=0, atol=0)


def test_auto_classes_resolve_after_import(sed_model, tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForAudioClassification

    sed_model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), HTSATConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), HTSATModel)
    assert isinstance(AutoModelForAudioClassification.from_pretrained(tmp_path), HTSATForAudioClassification)


# ------------------------------------------------------------------------------------ hooks and the engine
def test_a_forward_hook_on_a_block_sees_that_blocks_tokens():
    """A hook on a block (e.g. for activations) makes its stage call each block as a module again, in its window order,
    so the hook sees the block's own output; the logits do not change."""
    torch.manual_seed(5)
    model = HTSATForSoundEventDetection(tiny_config(depths=[2, 2, 2, 1])).eval()
    inputs = features(batch=2)
    with torch.no_grad():
        plain = model(inputs).frame_logits
    seen = []
    handle = model.htsat.stages[0].blocks[1].register_forward_hook(lambda module, args, output: seen.append(output[0]))
    try:
        with torch.no_grad():
            hooked = model(inputs).frame_logits
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].shape == (2, model.config.stage_grid_size(0) ** 2, model.config.embed_dim)
    torch.testing.assert_close(hooked, plain, atol=1e-6, rtol=1e-6)


def test_tokens_a_hook_received_are_not_changed_by_later_in_place_updates():
    """CPU inference updates a stage's tokens in place only where nothing else holds them: tokens handed to a forward
    hook (of the patch embedding, or of a stage) keep their values, and the logits do not change."""
    torch.manual_seed(7)
    model = HTSATForSoundEventDetection(tiny_config(depths=[2, 2, 2, 1])).eval()
    inputs = features(batch=2)
    with torch.no_grad():
        plain = model(inputs).frame_logits
    for producer in (model.htsat.patch_embed, model.htsat.stages[0], model.htsat.stages[1]):
        kept = []
        handle = producer.register_forward_hook(
            lambda module, args, output: kept.append((output, output.clone()) if torch.is_tensor(output) else
                                                     (output[0], output[0].clone()))
        )
        try:
            with torch.no_grad():
                hooked = model(inputs).frame_logits
        finally:
            handle.remove()
        (received, at_the_time), = kept
        assert torch.equal(received, at_the_time), f"the tokens {type(producer).__name__} handed to its hook changed"
        torch.testing.assert_close(hooked, plain, atol=1e-6, rtol=1e-6)


def test_token_semantic_head_equals_its_convolution(sed_model):
    """The head computes its Conv2d as one GEMM over time patches; it must equal the convolution it stores."""
    head = sed_model.classifier
    tokens = torch.randn(3, head.grid * head.grid, sed_model.config.hidden_size)
    n, _, hidden = tokens.shape
    ratio, groups, grid = sed_model.config.freq_ratio, head.freq_groups, head.grid
    feature_map = tokens.transpose(1, 2).reshape(n, hidden, ratio, groups, grid).permute(0, 1, 3, 2, 4)
    expected = head.conv(feature_map.reshape(n, hidden, groups, ratio * grid)).flatten(2).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(head(tokens), expected, atol=1e-5, rtol=1e-5)


def test_stitcher_hands_out_final_steps_and_stays_small():
    """`pop_final` + `result` give the same grid as one stitcher that keeps everything, while holding only the steps
    that later windows can still reach."""
    step = 10.0 / 32
    torch.manual_seed(0)
    windows = [(start * 0.01, torch.rand(1, 32, 3)) for start in range(0, 360000, 500)]  # an hour, every 5 s
    keep_all = StepStitcher(None, step, 3)
    streaming = StepStitcher(None, step, 3)
    parts, largest = [], 0
    for start, values in windows:
        keep_all.add(values, [start])
        streaming.add(values, [start])
        parts.append(streaming.pop_final(streaming.first_step(start)))
        largest = max(largest, streaming.sums.shape[0])
    total = keep_all.first_step(windows[-1][0]) + 32
    parts.append(streaming.result(total))
    torch.testing.assert_close(torch.cat(parts), keep_all.result(total), rtol=0, atol=0)
    assert total > 11000 and largest <= 1025  # an hour's 11,000 steps went through its first 1025 rows, never grown
    with pytest.raises(ValueError, match="already handed out"):
        streaming.add(windows[0][1], [0.0])


def test_attention_weights_are_the_tensors_used_so_gradients_reach_them():
    torch.manual_seed(0)
    model = HTSATForAudioClassification(
        HTSATConfig(embed_dim=8, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 2], num_labels=3)
    ).eval()
    features = torch.randn(2, 1001, 64)
    output = model(features, output_attentions=True)
    grads = torch.autograd.grad(output.logits[:, 0].sum(), output.attentions)
    assert all(g.shape == a.shape and g.abs().sum() > 0 for g, a in zip(grads, output.attentions))
    assert output.attentions[0].shape == (2, 64, 1, 64, 64)  # (batch, windows, heads, tokens, tokens)
    output.attentions[1].retain_grad()


def test_saving_and_loading_a_folder_shows_no_progress_bars(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    model = HTSATForAudioClassification(HTSATConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1]))
    model.save_pretrained(tmp_path)
    HTSATForAudioClassification.from_pretrained(tmp_path)
    err = capfd.readouterr().err
    assert "Writing model shards" not in err and "Loading weights" not in err
    assert hf_logging.is_progress_bar_enabled()  # switched back on afterwards


def test_a_two_label_config_reloads_with_two_labels(tmp_path):
    """Transformers drops a 2-label id2label from config.json as its default; HTS-AT's default is 527 AudioSet
    labels, so without it a binary model reloaded with 527."""
    HTSATConfig(num_labels=2).save_pretrained(tmp_path)
    assert HTSATConfig.from_pretrained(tmp_path).num_labels == 2
    HTSATConfig(id2label={0: "speech", 1: "music"}).save_pretrained(tmp_path)
    assert HTSATConfig.from_pretrained(tmp_path).id2label == {0: "speech", 1: "music"}
