"""Configuration of HTS-AT as the audio tower of CLAP (`HTSATClapModel`): an `HTSATConfig` for the audio tower beside
CLAP's own text configuration (`ClapTextConfig`), the joint projection size and the logit scale.

Relative imports only: this module travels with saved folders as remote code.
"""

from __future__ import annotations

from typing import Any

from transformers import ClapTextConfig, PreTrainedConfig

from .configuration_htsat import HTSATConfig

# The front end of `laion/clap-htsat-unfused` (its `preprocessor_config.json`: ClapFeatureExtractor with
# truncation="rand_trunc", padding="repeatpad", Slaney mel filters): used when no feature extractor is given.
CLAP_FRONT_END = dict(sampling_rate=48000, n_fft=1024, hop_length=480, f_min=50.0, f_max=14000.0, clip_seconds=10.0)


class HTSATClapConfig(PreTrainedConfig):
    r"""
    text_config (`ClapTextConfig` or dict): CLAP's text tower (a RoBERTa encoder), unchanged.
    audio_config (`HTSATConfig` or dict): the HTS-AT audio tower, with CLAP's front end (48 kHz, hop 480, 64 mel bins,
        10-s windows); `use_token_semantic_head` is irrelevant (the tower has no head).
    projection_dim (`int`, 512), projection_hidden_act (`str`, "relu"): CLAP's two-layer projections into the joint
        space (`linear1` -> activation -> `linear2`, one per tower).
    logit_scale_init_value (`float`, 1 / 0.07): initial value of exp(logit_scale_a) and exp(logit_scale_t).
    """

    model_type = "htsat_clap"
    sub_configs_defaults = {"text_config": ClapTextConfig, "audio_config": HTSATConfig}

    text_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None
    logit_scale_init_value: float = 1 / 0.07
    projection_dim: int = 512
    projection_hidden_act: str = "relu"
    initializer_factor: float = 1.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.text_config.projection_dim = self.projection_dim
        self.text_config.projection_hidden_act = self.projection_hidden_act
        self.hidden_size = self.text_config.hidden_size
        self.num_hidden_layers = self.text_config.num_hidden_layers

    @classmethod
    def from_clap_config(cls, clap_config: Any, feature_extractor: Any = None) -> HTSATClapConfig:
        """The HTS-AT twin of a Transformers `ClapConfig` (or its dict): the text config as it is, the audio tower's
        sizes from CLAP's audio config, the front end from `feature_extractor` (a `ClapFeatureExtractor` or its
        dict; default: `laion/clap-htsat-unfused`'s). The fused variant is refused (`check_unfused`)."""
        clap = clap_config.to_dict() if hasattr(clap_config, "to_dict") else dict(clap_config)
        audio = dict(clap.get("audio_config") or {})
        check_unfused(audio)
        stride = audio.get("patch_stride", 4)
        stride = stride[0] if isinstance(stride, (list, tuple)) else stride
        act = audio.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"This CLAP audio tower uses hidden_act={act!r}; HTS-AT's blocks use GELU.")
        audio_settings = dict(
            embed_dim=audio.get("patch_embeds_hidden_size", 96),
            depths=list(audio.get("depths", [2, 2, 6, 2])),
            num_heads=list(audio.get("num_attention_heads", [4, 8, 16, 32])),
            window_size=audio.get("window_size", 8),
            mlp_ratio=audio.get("mlp_ratio", 4.0),
            qkv_bias=audio.get("qkv_bias", True),
            spec_size=audio.get("spec_size", 256),
            num_mel_bins=audio.get("num_mel_bins", 64),
            patch_size=audio.get("patch_size", 4),
            patch_stride=stride,
            layer_norm_eps=audio.get("layer_norm_eps", 1e-5),
            drop_path_rate=0.0,
            use_token_semantic_head=False,
            spec_augment=False,
            num_labels=1,
            **front_end_of(feature_extractor),
        )
        return cls(
            text_config=clap.get("text_config") or {},
            audio_config=HTSATConfig(**audio_settings),
            projection_dim=clap.get("projection_dim", 512),
            projection_hidden_act=clap.get("projection_hidden_act", "relu"),
            logit_scale_init_value=clap.get("logit_scale_init_value", 1 / 0.07),
        )


def front_end_of(feature_extractor: Any = None) -> dict[str, Any]:
    """HTSATConfig front-end settings matching a `ClapFeatureExtractor` (or its dict); CLAP_FRONT_END for None."""
    if feature_extractor is None:
        return dict(CLAP_FRONT_END)
    settings = feature_extractor.to_dict() if hasattr(feature_extractor, "to_dict") else dict(feature_extractor)
    if settings.get("truncation", "rand_trunc") == "fusion":
        raise ValueError(
            "This ClapFeatureExtractor uses truncation='fusion' (HTK mel filters, four stacked crops for the fused "
            "model): not supported. The unfused checkpoint's extractor uses truncation='rand_trunc' (Slaney filters)."
        )
    return dict(
        sampling_rate=int(settings.get("sampling_rate", 48000)),
        n_fft=int(settings.get("fft_window_size", 1024)),
        hop_length=int(settings.get("hop_length", 480)),
        f_min=float(settings.get("frequency_min", 0.0)),
        f_max=float(settings.get("frequency_max", 14000.0)),
        clip_seconds=float(settings.get("max_length_s", 10)),
    )


def check_unfused(audio_config: dict) -> None:
    """A ValueError naming what is unsupported when a CLAP audio config is the fused variant."""
    if audio_config.get("enable_fusion"):
        raise ValueError(
            "This is a fused CLAP checkpoint (audio_config.enable_fusion=True, e.g. laion/clap-htsat-fused): its fusion "
            f"branch (fusion_type={audio_config.get('fusion_type')!r}: the mel_conv2d and fusion_model (AFF) layers "
            "that mix a downsampled whole input with three random 10-s crops when is_longer=True) is not supported. "
            "Use an unfused checkpoint (e.g. laion/clap-htsat-unfused); htsat-hf windows long inputs instead."
        )


HTSATClapConfig.register_for_auto_class()

__all__ = ["CLAP_FRONT_END", "HTSATClapConfig", "check_unfused", "front_end_of"]
