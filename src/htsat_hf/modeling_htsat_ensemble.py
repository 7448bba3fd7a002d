"""An ensemble of HTS-AT models as one Transformers model: usable with `pipeline("audio-classification")` and
`pipeline("sound-event-detection")`, savable with `save_pretrained` and loadable with `trust_remote_code`.

Relative imports only: `save_pretrained` copies this module and the ones it imports beside the weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_htsat import HTSATConfig
from .configuration_htsat_ensemble import HTSATEnsembleConfig
from .modeling_htsat import (
    HTSATForAudioClassification,
    HTSATForSoundEventDetection,
    HTSATModel,
    HTSATPreTrainedModel,
    HTSATSoundEventDetectionOutput,
    HTSATTimeAxisMixin,
    clip_loss,
    with_loading_info,
)
from .scores import is_exclusive

PROBABILITY_EPS = 1e-6  # probabilities are clamped to [eps, 1 - eps] before going back to logits

ENSEMBLE_AUTO_MAP = {
    "AutoConfig": "configuration_htsat_ensemble.HTSATEnsembleConfig",
    "AutoModel": "modeling_htsat_ensemble.HTSATEnsembleModel",
    "AutoModelForAudioClassification": "modeling_htsat_ensemble.HTSATEnsembleModel",
    "AutoModelForAudioFrameClassification": "modeling_htsat_ensemble.HTSATEnsembleModel",
}


def combine_logits(member_logits: Sequence[torch.Tensor], average: str, exclusive: bool) -> torch.Tensor:
    """
    One set of logits from the members'. `average="logits"`: their mean. `average="probabilities"`: the mean of the
    members' probabilities, returned as logits so that whatever applies the output function gets that mean back:
    `logit(mean(sigmoid))` for independent classes, `log(mean(softmax))` for exclusive classes (softmax of it is the
    mean itself).
    """
    stacked = torch.stack([logits.float() for logits in member_logits])
    if average == "logits":
        combined = stacked.mean(0)
    elif exclusive:
        combined = stacked.softmax(-1).mean(0).clamp_min(PROBABILITY_EPS).log()
    else:
        combined = torch.logit(stacked.sigmoid().mean(0), eps=PROBABILITY_EPS)
    return combined.to(member_logits[0].dtype)


class HTSATEnsembleModel(HTSATTimeAxisMixin, PreTrainedModel):
    """
    Several HTS-AT models run on the same features and combined into one output: `logits` (clip) and, when every
    member has the token-semantic head on the same time grid, `frame_logits` (steps over time), as
    `HTSATForSoundEventDetection` returns them.

    How members are combined (`config.average`):
        - `"probabilities"` (default), as the paper's ensemble does: the mean of the members' probabilities, returned
          as logits of that mean (`logit(mean(sigmoid(.)))` for multi-label, `log(mean(softmax(.)))` for single-label
          clip and frame logits alike). The pipelines apply the sigmoid / softmax to the logits as `problem_type`
          says (`scores.logits_to_scores`), so the scores they report are exactly the averaged probabilities.
          Averaging probabilities keeps one over-confident member (a very large logit) from dominating, and each
          member's scores stay calibrated as trained.
        - `"logits"`: the mean of the logits (a geometric-mean-like combination).
    The clip `logits` combine the members' clip logits (each the time average of the member's own step logits).
    For inputs longer than one window, the step logits are combined window by window and then stitched over time,
    so `frame_logits` equal what `pipeline("sound-event-detection")` computes by streaming windows through the
    ensemble.
    """

    config: HTSATEnsembleConfig
    config_class = HTSATEnsembleConfig
    main_input_name = "input_features"
    input_modalities = ("audio",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["HTSATStage"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"relative_position_index", r"attn_mask", r"shift_mask"]
    accepts_loss_kwargs = False

    def __init__(self, config: HTSATEnsembleConfig):
        super().__init__(config)
        member_configs = [config.member_config(index) for index in range(config.num_members)]
        self.members = nn.ModuleList([self._member_class(member)(member) for member in member_configs])
        self.post_init()

    @staticmethod
    def _member_class(config: HTSATConfig) -> type[HTSATPreTrainedModel]:
        return HTSATForSoundEventDetection if config.use_token_semantic_head else HTSATForAudioClassification

    @classmethod
    def from_members(cls, models: Sequence[HTSATPreTrainedModel], average: str = "probabilities") -> HTSATEnsembleModel:
        """An ensemble holding copies of the weights of `models` (HTS-AT models with heads)."""
        config = HTSATEnsembleConfig.from_member_configs([model.config for model in models], average=average)
        ensemble = cls(config)
        for member, model in zip(ensemble.members, models):
            member.load_state_dict(model.state_dict(), strict=True)
        return ensemble.eval()

    def _init_weights(self, module: nn.Module) -> None:
        HTSATPreTrainedModel._init_weights(self, module)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, keeping Transformers' load report on the model (`loading_info`)."""
        return with_loading_info(super().from_pretrained, *args, **kwargs)

    @property
    def htsat(self) -> HTSATModel:
        """The first member's backbone. Members share the time axis, so its `window_layout` is the ensemble's (the
        sound-event-detection pipeline reads it there)."""
        return self.members[0].htsat

    def freeze_feature_encoder(self) -> None:
        for member in self.members:
            member.freeze_feature_encoder()

    def forward(
        self,
        input_features: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> HTSATSoundEventDetectionOutput | tuple:
        """input_features: (batch, frames, num_mel_bins) as `HTSATFeatureExtractor` computes them. labels: as for
        `HTSATForAudioClassification` (the loss is computed on the combined logits)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        exclusive = is_exclusive(self.config.problem_type)
        clip_logits, window_steps = [], []
        starts, num_frames = [0], input_features.shape[1]
        for member in self.members:
            if not self.config.use_token_semantic_head:
                clip_logits.append(member(input_features=input_features).logits)
                continue
            tokens, starts, window_frames = member.htsat.encode_windows(input_features)
            num_frames = num_frames if len(starts) > 1 else window_frames
            steps = member.classifier(tokens.flatten(0, 1)).unflatten(0, tokens.shape[:2])
            window_steps.append(steps)  # (batch, windows, steps, labels)
            clip_logits.append(self._stitch(steps, starts, num_frames).mean(dim=1))  # the member's own clip logits
        logits = combine_logits(clip_logits, self.config.average, exclusive)
        frame_logits = None
        if window_steps:  # combined window by window, then stitched: what the streaming SED pipeline computes
            combined = combine_logits(window_steps, self.config.average, exclusive)
            frame_logits = self._stitch(combined, starts, num_frames)
        loss = clip_loss(logits, labels, self.config) if labels is not None else None
        output = HTSATSoundEventDetectionOutput(loss=loss, logits=logits, frame_logits=frame_logits)
        return output if return_dict else output.to_tuple()

    def _stitch(self, window_steps: torch.Tensor, starts: list[int], num_frames: int) -> torch.Tensor:
        """(batch, windows, steps, labels) -> (batch, total steps, labels) on the input's time grid."""
        if window_steps.shape[1] == 1:
            return window_steps[:, 0]
        return torch.stack([self.stitch_window_steps(example, starts, num_frames) for example in window_steps])

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves weights and config with an `auto_map` for every Auto class the ensemble serves, and its code (this
        module and the HTS-AT modules it imports), so the folder loads with `trust_remote_code=True`."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **ENSEMBLE_AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)


HTSATEnsembleModel.register_for_auto_class("AutoModelForAudioClassification")

__all__ = ["HTSATEnsembleModel", "combine_logits"]
