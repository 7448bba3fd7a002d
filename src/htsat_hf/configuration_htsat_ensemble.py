"""Configuration of an ensemble of HTS-AT models used as one model (the paper's six-model AudioSet ensemble)."""

from __future__ import annotations

from typing import Any

from .configuration_htsat import HTSATConfig

# Settings every member must share: they fix the input features, the time axis and the label space.
SHARED_FIELDS = (
    "sampling_rate",
    "n_fft",
    "hop_length",
    "num_mel_bins",
    "f_min",
    "f_max",
    "clip_seconds",
    "spec_size",
    "long_input_hop_seconds",
)
# Settings a member may choose for itself.
MEMBER_FIELDS = (
    "patch_size",
    "patch_stride",
    "window_size",
    "embed_dim",
    "depths",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "drop_path_rate",
    "layer_norm_eps",
    "initializer_range",
    "use_token_semantic_head",
    "spec_augment",
    "time_mask_width",
    "num_time_masks",
    "freq_mask_width",
    "num_freq_masks",
)
AVERAGES = ("probabilities", "logits")


class HTSATEnsembleConfig(HTSATConfig):
    r"""
    An ensemble of HTS-AT models. The inherited HTS-AT settings are the ones all members share (front end, time
    axis, labels, `problem_type`); the encoder fields inherited beside them are the first member's and unused, except
    `use_token_semantic_head`: True when every member has the token-semantic head on the same time grid, i.e. when
    the ensemble gives `frame_logits` (sound event detection).

    Args:
        members (`list[dict]`): per member, its own encoder settings (the `MEMBER_FIELDS` of `HTSATConfig`).
        average (`str`, `"probabilities"`): how members are combined, see `HTSATEnsembleModel`.
    """

    model_type = "htsat_ensemble"

    members: list[dict[str, Any]] | None = None
    average: str = "probabilities"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not self.members:
            self.members = [{}]
        if self.average not in AVERAGES:
            raise ValueError(f"average={self.average!r}: choose one of {AVERAGES}.")
        unknown = {key for member in self.members for key in member} - set(MEMBER_FIELDS)
        if unknown:
            raise ValueError(
                f"members set {sorted(unknown)}, which all members must share; set them on the ensemble config."
            )

    @property
    def num_members(self) -> int:
        return len(self.members)

    def member_config(self, index: int) -> HTSATConfig:
        """The `HTSATConfig` of member `index`: the shared settings plus its own."""
        shared = {name: getattr(self, name) for name in SHARED_FIELDS}
        labels = _labels(self)
        return HTSATConfig(**shared, **labels, problem_type=self.problem_type, **self.members[index])

    @classmethod
    def from_member_configs(cls, configs: list[HTSATConfig], average: str = "probabilities") -> HTSATEnsembleConfig:
        """Combines members' configs; raises when they do not share the front end, time axis and labels."""
        if not configs:
            raise ValueError("An ensemble needs at least one member.")
        first = configs[0]
        for index, config in enumerate(configs[1:], start=1):
            differing = [name for name in SHARED_FIELDS if getattr(config, name) != getattr(first, name)]
            if dict(config.id2label) != dict(first.id2label):
                differing.append("id2label")
            if config.problem_type != first.problem_type:
                differing.append("problem_type")
            if differing:
                raise ValueError(
                    f"Member {index} differs from member 0 in {differing}; members must share the front end, the "
                    "time axis and the labels."
                )
        members = [{name: _plain(getattr(config, name)) for name in MEMBER_FIELDS} for config in configs]
        shared = {name: getattr(first, name) for name in SHARED_FIELDS}
        frame_outputs = all(c.use_token_semantic_head and c.token_steps == first.token_steps for c in configs)
        return cls(
            **shared,
            **{**members[0], "use_token_semantic_head": frame_outputs},
            **_labels(first),
            problem_type=first.problem_type,
            members=members,
            average=average,
        )


def _labels(config: HTSATConfig) -> dict[str, dict]:
    id2label = {int(index): name for index, name in config.id2label.items()}
    return {"id2label": id2label, "label2id": {name: index for index, name in id2label.items()}}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


HTSATEnsembleConfig.register_for_auto_class()

__all__ = ["HTSATEnsembleConfig"]
