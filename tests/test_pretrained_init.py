"""Pretrained starts: every tensor of a small random Swin / CLAP lands where it should, and the CLAP tower and the
converted backbone compute the same embedding wherever the two architectures agree."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import ClapAudioConfig, ClapAudioModel, SwinConfig, SwinForImageClassification, SwinModel

from htsat_hf import HTSATConfig, HTSATForAudioClassification, HTSATForSoundEventDetection, HTSATModel
from htsat_hf.modeling_htsat import fold_spectrogram
from htsat_hf.weights.pretrained_init import (
    init_from_clap,
    init_from_swin,
    load_weights,
    resize_relative_position_bias_table,
)

DEPTHS = [1, 1, 2, 1]
BATCH_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
V4_NAMES = {  # v5 Swin name -> v4 name
    "attention.q_proj": "attention.self.query",
    "attention.k_proj": "attention.self.key",
    "attention.v_proj": "attention.self.value",
    "attention.o_proj": "attention.output.dense",
    "attention.relative_position_bias.relative_position_bias_table": "attention.self.relative_position_bias_table",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}


def small_swin(window: int = 7, heads=(1, 2, 2, 4), image_size: int = 224, classifier: bool = True):
    torch.manual_seed(0)
    config = SwinConfig(image_size=image_size, embed_dim=8, depths=DEPTHS, num_heads=list(heads), window_size=window,
                        num_labels=3)
    model = SwinForImageClassification(config) if classifier else SwinModel(config)
    with torch.no_grad():  # make every tensor distinctive, norms and bias tables included
        for parameter in model.parameters():
            parameter.normal_()
    return model.eval()


def htsat_config(**overrides) -> HTSATConfig:
    settings = dict(embed_dim=8, depths=DEPTHS, num_heads=[1, 2, 2, 4], num_labels=5)
    return HTSATConfig(**{**settings, **overrides})


# ------------------------------------------------------------------------------------------------------ Swin
def test_swin_tensors_land_where_they_should():
    swin = small_swin()
    source = swin.state_dict()
    report = init_from_swin(htsat_config(), swin, rgb_reduction="sum")
    ours = report.model.state_dict()

    torch.testing.assert_close(
        ours["htsat.patch_embed.proj.weight"],
        source["swin.embeddings.patch_embeddings.projection.weight"].sum(1, keepdim=True),
    )
    torch.testing.assert_close(
        ours["htsat.patch_embed.proj.bias"], source["swin.embeddings.patch_embeddings.projection.bias"]
    )
    torch.testing.assert_close(ours["htsat.patch_embed.norm.weight"], source["swin.embeddings.norm.weight"])
    torch.testing.assert_close(ours["htsat.norm.bias"], source["swin.layernorm.bias"])
    for stage, depth in enumerate(DEPTHS):
        for block in range(depth):
            theirs = f"swin.encoder.layers.{stage}.blocks.{block}."
            mine = f"htsat.stages.{stage}.blocks.{block}."
            for part in ("weight", "bias"):
                qkv = torch.cat([source[f"{theirs}attention.{p}_proj.{part}"] for p in "qkv"])
                torch.testing.assert_close(ours[f"{mine}attn.qkv.{part}"], qkv)
                torch.testing.assert_close(ours[f"{mine}attn.proj.{part}"], source[f"{theirs}attention.o_proj.{part}"])
                torch.testing.assert_close(ours[f"{mine}norm1.{part}"], source[f"{theirs}layernorm_before.{part}"])
                torch.testing.assert_close(ours[f"{mine}norm2.{part}"], source[f"{theirs}layernorm_after.{part}"])
                torch.testing.assert_close(ours[f"{mine}mlp.fc1.{part}"], source[f"{theirs}mlp.fc1.{part}"])
                torch.testing.assert_close(ours[f"{mine}mlp.fc2.{part}"], source[f"{theirs}mlp.fc2.{part}"])
            table = ours[f"{mine}attn.relative_position_bias_table"]
            assert table.shape == (15 * 15, swin.config.num_heads[stage])  # window 7 -> 8: 13x13 -> 15x15
        if stage < len(DEPTHS) - 1:
            for name in ("reduction.weight", "norm.weight", "norm.bias"):
                torch.testing.assert_close(
                    ours[f"htsat.stages.{stage}.downsample.{name}"],
                    source[f"swin.encoder.layers.{stage}.downsample.{name}"],
                )

    batch_norm = [f"htsat.mel_batch_norm.{n}" for n in BATCH_NORM_TENSORS]
    assert report.new == sorted(["classifier.conv.weight", "classifier.conv.bias"] + batch_norm)
    assert report.unused == ["classifier.bias", "classifier.weight"]
    assert len(report.resized) == sum(DEPTHS)
    assert set(report.loaded) | set(report.new) == set(ours)
    assert report.config_overrides == {}


def test_bias_table_resize_keeps_matching_offsets_exact():
    torch.manual_seed(1)
    table = torch.randn(13 * 13, 3)
    resized = resize_relative_position_bias_table(table, 8)
    assert resized.shape == (15 * 15, 3)
    source, target = table.t().reshape(3, 13, 13), resized.t().reshape(3, 15, 15)
    # target offset d reads source offset d * 6 / 7: exact at d in {-7, 0, 7} (grid indices 0, 7, 14 <- 0, 6, 12)
    for i, si in ((0, 0), (7, 6), (14, 12)):
        for j, sj in ((0, 0), (7, 6), (14, 12)):
            torch.testing.assert_close(target[:, i, j], source[:, si, sj])
    constant = resize_relative_position_bias_table(torch.full((169, 2), 0.25), 8)  # smooth tables stay smooth
    torch.testing.assert_close(constant, torch.full((225, 2), 0.25))
    torch.testing.assert_close(resize_relative_position_bias_table(table, 7), table)


def test_swin_mean_reduction_and_old_key_names():
    swin = small_swin()
    state = swin.state_dict()
    old = {}  # the v4 layout (attention.self.query, attention.output.dense, intermediate/output.dense)
    for key, value in state.items():
        for new_name, old_name in V4_NAMES.items():
            key = key.replace(new_name, old_name)
        old[key] = value
    old["swin.encoder.layers.0.blocks.0.attention.self.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    new_names = init_from_swin(htsat_config(), state, rgb_reduction="mean").model.state_dict()
    old_names = init_from_swin(htsat_config(), old, rgb_reduction="mean")
    for key, value in old_names.model.state_dict().items():
        if not key.startswith(("classifier.", "htsat.mel_batch_norm.")):
            torch.testing.assert_close(value, new_names[key], msg=key)
    torch.testing.assert_close(
        new_names["htsat.patch_embed.proj.weight"],
        state["swin.embeddings.patch_embeddings.projection.weight"].mean(1, keepdim=True),
    )
    assert "swin.encoder.layers.0.blocks.0.attention.self.relative_position_index" in old_names.unused


def test_swin_with_the_same_window_computes_the_same_tokens():
    """With window 7 on both sides (a 224 x 224 image: 56 mel bins x 4 chunks) nothing is resized, and a grey image
    of the folded spectrogram through Swin gives exactly our tokens: every stage, merge order and norm is mapped."""
    swin = small_swin(classifier=False)
    config = htsat_config(
        window_size=7, spec_size=224, num_mel_bins=56, clip_seconds=8.9, use_token_semantic_head=False
    )
    report = init_from_swin(config, swin, rgb_reduction="sum")
    assert report.resized == []
    model = report.model.eval()
    features = torch.randn(2, config.image_frames, 56)
    with torch.no_grad():
        ours = model.htsat(features).last_hidden_state
        image = fold_spectrogram(model.htsat.normalize_features(features), config)
        theirs = swin(pixel_values=image.expand(-1, 3, -1, -1)).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_swin_into_an_existing_model_and_from_a_file(tmp_path):
    swin = small_swin(classifier=False)
    path = tmp_path / "swin.safetensors"
    save_file({k: v.contiguous() for k, v in swin.state_dict().items()}, str(path))
    model = HTSATForSoundEventDetection(htsat_config())
    report = init_from_swin(model, path)
    assert report.model is model
    backbone = init_from_swin(HTSATModel(htsat_config()), swin)
    assert "patch_embed.proj.weight" in backbone.loaded
    assert set(backbone.new) == {f"mel_batch_norm.{n}" for n in BATCH_NORM_TENSORS}
    with pytest.raises(ValueError, match="num_heads"):  # the paper's 4/8/16/32 heads cannot take 1/2/2/4-head weights
        init_from_swin(HTSATForAudioClassification(htsat_config(num_heads=[1, 2, 4, 8])), swin)


def test_pickles_are_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="pickle"):
        load_weights(path)
    assert set(load_weights(path, allow_pickle=True)) == {"x"}
    with pytest.raises(FileNotFoundError, match="pickled"):
        load_weights(tmp_path)


# ------------------------------------------------------------------------------------------------------ CLAP
def small_clap(fusion: bool = False) -> ClapAudioModel:
    torch.manual_seed(0)
    config = ClapAudioConfig(
        spec_size=256, window_size=8, num_mel_bins=64, patch_embeds_hidden_size=8, hidden_size=64, depths=DEPTHS,
        num_attention_heads=[1, 2, 4, 8], hidden_dropout_prob=0.0, drop_path_rate=0.0,
        enable_fusion=fusion, fusion_type="aff_2d" if fusion else None,
    )
    model = ClapAudioModel(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(std=0.2 if "weight" in name else 0.1)
        batch_norm = model.audio_encoder.batch_norm
        batch_norm.running_mean.normal_()
        batch_norm.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("fusion", [False, True])
def test_clap_tower_gives_the_same_embedding(fusion):
    clap = small_clap(fusion)
    config = HTSATConfig(embed_dim=8, depths=DEPTHS, num_heads=[1, 1, 1, 1], window_size=4, num_labels=7)
    report = init_from_clap(config, clap)
    assert report.config_overrides["num_heads"] == ([1, 1, 1, 1], [1, 2, 4, 8])
    assert report.config_overrides["window_size"] == (4, 8)
    assert report.new == ["classifier.conv.bias", "classifier.conv.weight"]
    assert all("relative_position_index" in k or "fusion_model" in k or "mel_conv2d" in k for k in report.unused)
    assert bool(any("fusion" in k for k in report.unused)) == fusion
    model = report.model.eval()

    features = torch.randn(2, 1001, 64) * 10 - 40  # (batch, frames, mel): 10 s at hop 320; CLAP's is (batch, 1, T, F)
    with torch.no_grad():
        ours = model.htsat(features)
        clap_input = features.unsqueeze(1).expand(-1, 4 if fusion else 1, -1, -1)
        is_longer = torch.zeros(2, 1, dtype=torch.bool)  # fused CLAP only equals HTS-AT without its local branch
        theirs = clap(input_features=clap_input, is_longer=is_longer)
    torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, rtol=1e-5, atol=1e-5)
    # CLAP's last_hidden_state is the token map rearranged for the token-semantic head: (batch, C, 2, 32)
    tokens = ours.last_hidden_state
    grid, ratio = 8, config.freq_ratio
    token_map = tokens.transpose(1, 2).reshape(2, 64, ratio, grid // ratio, grid)
    token_map = token_map.permute(0, 1, 3, 2, 4).reshape(2, 64, grid // ratio, ratio * grid)
    torch.testing.assert_close(token_map, theirs.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_clap_state_dict_from_a_whole_clap_model_and_a_mismatched_model():
    clap = small_clap()
    state = {f"audio_model.{k}": v for k, v in clap.state_dict().items()}
    state["audio_projection.linear1.weight"] = torch.zeros(4, 64)
    state["text_model.embeddings.word_embeddings.weight"] = torch.zeros(3, 4)
    state["logit_scale_a"] = torch.zeros(())
    report = init_from_clap(HTSATConfig(embed_dim=8, depths=DEPTHS, num_heads=[1, 2, 4, 8], num_labels=3), state)
    assert {"audio_projection.linear1.weight", "text_model.embeddings.word_embeddings.weight", "logit_scale_a"} <= set(
        report.unused
    )
    torch.testing.assert_close(
        report.model.state_dict()["htsat.mel_batch_norm.running_var"], clap.audio_encoder.batch_norm.running_var
    )
    with pytest.raises(ValueError, match="embed_dim"):
        wider = HTSATConfig(embed_dim=16, depths=DEPTHS, num_heads=[1, 2, 4, 8])
        init_from_clap(HTSATForAudioClassification(wider), clap)
