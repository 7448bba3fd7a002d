"""CLAP with an HTS-AT audio tower (`HTSATClapModel`): CLAP's text tower, both projections and the logit scales beside
`HTSATModel`, so that text-audio similarity works for inputs of any length, per window, and per time step.

Definitions (tests/test_clap.py checks each):

- **Clip embedding (up to one window).** As Transformers' `ClapModel.get_audio_features`: the final LayerNorm'ed
  tokens of the window averaged over frequency and time (the pooled embedding), the audio projection (`linear1` ->
  ReLU -> `linear2`), L2-normalised. Text embeddings as `ClapModel.get_text_features` (the same `ClapTextModel`).
- **Longer inputs.** Cut into the model's overlapping 10-s windows (`HTSATModel.window_layout`); the input's pooled
  embedding is the mean of the windows' pooled embeddings (before the projection), which is `HTSATModel`'s
  `pooler_output` (the mean of all windows' tokens), then projected and normalised as for one window. Its zero-shot
  logits are `exp(logit_scale_a) * cos(audio, text)` as CLAP's `logits_per_audio`.
- **Step embedding.** A step is one time column of the final token map, in the order of HTS-AT's token-semantic head
  (time chunk, then token column): the mean over the frequency tokens at that step of the same LayerNorm'ed tokens
  CLAP pools. The mean of a window's step embeddings is exactly its pooled embedding. Each step embedding is projected
  and normalised as a clip embedding; its similarity with each phrase's text embedding times exp(logit_scale_a) is the
  step's logit: (batch, steps, phrases) per window, and for long inputs stitched onto one time grid with the same
  `stitch_on_grid` as HTS-AT's frame logits. (The projection is not linear, so the mean of the step logits is not the
  clip logit; the identity holds for the embeddings before the projection.)

Relative imports only: this module travels with saved folders as remote code.
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ClapTextModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.models.clap.modeling_clap import ClapOutput, contrastive_loss

from .configuration_htsat import HTSATConfig
from .configuration_htsat_clap import HTSATClapConfig, check_unfused
from .modeling_htsat import HTSATModel, token_map_by_time
from .time_axis import step_seconds, stitch_window_steps, total_steps

CALIBRATIONS = ("softmax", "sigmoid")
DEFAULT_TEMPLATE = "This is a sound of {}."  # Transformers' zero-shot-audio-classification default


class HTSATClapProjection(nn.Module):
    """CLAP's projection into the joint space (`ClapProjectionLayer`, same weight names): linear1 -> act -> linear2."""

    def __init__(self, hidden_size: int, projection_dim: int, hidden_act: str):
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, projection_dim)
        self.activation = ACT2FN[hidden_act]
        self.linear2 = nn.Linear(projection_dim, projection_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.activation(self.linear1(hidden_states)))


class HTSATClapPreTrainedModel(PreTrainedModel):
    config: HTSATClapConfig
    config_class = HTSATClapConfig
    base_model_prefix = "htsat_clap"
    main_input_name = "input_features"
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = False
    _keys_to_ignore_on_load_unexpected = [r"relative_position_index", r"attn_mask", r"shift_mask"]

    def _init_weights(self, module: nn.Module) -> None:
        factor = self.config.initializer_factor
        if isinstance(module, HTSATClapModel):
            init.constant_(module.logit_scale_a, math.log(self.config.logit_scale_init_value))
            init.constant_(module.logit_scale_t, math.log(self.config.logit_scale_init_value))
        elif isinstance(module, nn.Linear):
            std = (self.config.hidden_size**-0.5) * ((2 * self.config.num_hidden_layers) ** -0.5) * factor
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, keeping the load report as `model.loading_info` (what
        `inference_checks.check_weights_loaded` reads)."""
        wanted = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        model.loading_info = info
        return (model, info) if wanted else model


@dataclass
class HTSATClapStepOutput(ModelOutput):
    """
    step_logits: (batch, steps, phrases) exp(logit_scale_a) * cos(step embedding, phrase) on the model's step grid.
    logits_per_audio: (batch, phrases) the input's clip logits (windows combined as documented above).
    step_embeds: (batch, steps, projection_dim) normalised projected step embeddings (stitched for long inputs).
    audio_embeds: (batch, projection_dim) normalised clip embeddings.
    window_logits: (batch, windows, phrases) each window's own clip logits.
    """

    step_logits: torch.Tensor | None = None
    logits_per_audio: torch.Tensor | None = None
    step_embeds: torch.Tensor | None = None
    audio_embeds: torch.Tensor | None = None
    window_logits: torch.Tensor | None = None


class HTSATClapModel(HTSATClapPreTrainedModel):
    """CLAP (Transformers' layout for the text tower, projections and logit scales) with `HTSATModel` as audio tower."""

    def __init__(self, config: HTSATClapConfig):
        super().__init__(config)
        self.logit_scale_a = nn.Parameter(torch.tensor(math.log(config.logit_scale_init_value)))
        self.logit_scale_t = nn.Parameter(torch.tensor(math.log(config.logit_scale_init_value)))
        self.text_model = ClapTextModel(config.text_config)
        self.text_projection = HTSATClapProjection(
            config.text_config.hidden_size, config.projection_dim, config.projection_hidden_act)
        self.audio_model = HTSATModel(config.audio_config)
        self.audio_projection = HTSATClapProjection(
            config.audio_config.hidden_size, config.projection_dim, config.projection_hidden_act)
        self.post_init()

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_clap(cls, clap: Any, feature_extractor: Any = None, clap_config: Any = None, allow_pickle: bool = False
                  ) -> HTSATClapModel:
        """
        An `HTSATClapModel` from a CLAP checkpoint in Transformers' layout: a `ClapModel`, a folder or
        `.safetensors` file of one, or its state dict (then pass `clap_config`, a `ClapConfig` or its dict). The audio
        tower is mapped by `weights.pretrained_init.init_from_clap`; the text tower, both projections and both logit
        scales are copied as they are. `feature_extractor`: the checkpoint's `ClapFeatureExtractor` (or its dict) for
        the front end (default: `laion/clap-htsat-unfused`'s). The fused variant is refused with an error naming its
        fusion branch. Every tensor of the model must come from the source.
        """
        # imported by name: the weights package is not part of the remote code (from_clap needs htsat_hf installed)
        pretrained_init = importlib.import_module("htsat_hf.weights.pretrained_init")
        init_from_clap, source_state = pretrained_init.init_from_clap, pretrained_init.source_state
        state, source_config = source_state(clap, allow_pickle)
        if clap_config is not None:
            source_config = clap_config.to_dict() if hasattr(clap_config, "to_dict") else dict(clap_config)
        if source_config is None:
            raise ValueError("A CLAP state dict carries no sizes: pass clap_config= (its ClapConfig or config.json).")
        check_unfused(dict(source_config.get("audio_config") or {}))
        fusion = sorted(key for key in state if ".fusion_model." in key or ".mel_conv2d." in key)
        if fusion:
            raise ValueError(
                f"This CLAP checkpoint has a fusion branch ({len(fusion)} tensors such as {fusion[0]}): the fused "
                "variant (laion/clap-htsat-fused) is not supported; use an unfused checkpoint.")
        model = cls(HTSATClapConfig.from_clap_config(source_config, feature_extractor))
        audio_prefix = "audio_model.audio_encoder."
        init_from_clap(model.audio_model, {k: v for k, v in state.items() if k.startswith(audio_prefix)},
                       model_class=HTSATModel)
        rest = {key: value for key, value in state.items() if not key.startswith(audio_prefix)}
        expected = {key for key in model.state_dict() if not key.startswith("audio_model.")}
        missing = sorted(expected - set(rest))
        unused = sorted(set(rest) - expected)
        if missing or unused:
            raise ValueError(f"The CLAP checkpoint does not fit: missing {missing[:8]}, unused {unused[:8]}.")
        model.load_state_dict(rest, strict=False)
        return model.eval()

    # -------------------------------------------------------------------------------------------------- text
    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None, **kwargs) -> BaseModelOutputWithPooling:
        """As `ClapModel.get_text_features`: the text tower's output, its `pooler_output` the normalised projection."""
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  **kwargs)
        outputs.pooler_output = F.normalize(self.text_projection(outputs.pooler_output), dim=-1)
        return outputs

    # ------------------------------------------------------------------------------------------------- audio
    def project_audio(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(..., hidden) pooled or step embeddings -> (..., projection_dim) normalised joint-space embeddings."""
        return F.normalize(self.audio_projection(embeddings), dim=-1)

    def step_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, tokens, hidden) final tokens of n windows -> (n, steps, hidden): at each time step (the order of the
        token-semantic head's steps: time chunk, then token column) the mean of the frequency tokens."""
        config: HTSATConfig = self.config.audio_config
        grid = config.stage_grid_size(config.num_stages - 1)
        return token_map_by_time(tokens, grid, config.freq_ratio).mean(dim=2).transpose(1, 2)

    def encode_audio(self, input_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Runs the audio tower: tokens (batch, windows, tokens, hidden), window start frames, frames per window."""
        return self.audio_model.encode_windows(input_features)

    def get_audio_features(self, input_features: torch.Tensor, is_longer: torch.Tensor | None = None,
                           attention_mask: torch.Tensor | None = None, **kwargs) -> BaseModelOutputWithPooling:
        """As `ClapModel.get_audio_features` for inputs of any length: `pooler_output` (batch, projection_dim) is the
        normalised projection of the mean of the windows' pooled embeddings; `last_hidden_state` the tokens
        (batch, windows * tokens, hidden). `is_longer` is accepted and ignored (the unfused model ignores it too)."""
        tokens, _, _ = self.encode_audio(input_features)
        return BaseModelOutputWithPooling(last_hidden_state=tokens.flatten(1, 2),
                                          pooler_output=self.project_audio(tokens.mean(dim=(1, 2))))

    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale_a): the scale of `logits_per_audio`, used for clip and step logits alike."""
        return self.logit_scale_a.exp()

    def forward(self, input_ids: torch.Tensor | None = None, input_features: torch.Tensor | None = None,
                is_longer: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, return_loss: bool | None = None, **kwargs) -> ClapOutput:
        """As `ClapModel.forward` (`logits_per_audio` with exp(logit_scale_a), `logits_per_text` with
        exp(logit_scale_t)); audio of any length."""
        audio = self.get_audio_features(input_features)
        text = self.get_text_features(input_ids, attention_mask, position_ids)
        audio_embeds, text_embeds = audio.pooler_output, text.pooler_output
        logits_per_text = text_embeds @ audio_embeds.t() * self.logit_scale_t.exp()
        logits_per_audio = audio_embeds @ text_embeds.t() * self.logit_scale_a.exp()
        loss = None
        if return_loss:
            loss = (contrastive_loss(logits_per_text) + contrastive_loss(logits_per_audio.t())) / 2.0
        return ClapOutput(loss=loss, logits_per_audio=logits_per_audio, logits_per_text=logits_per_text,
                          text_embeds=text_embeds, audio_embeds=audio_embeds, text_model_output=text,
                          audio_model_output=audio)

    def text_query(self, candidate_labels: list[str], tokenizer: Any = None,
                   hypothesis_template: str = DEFAULT_TEMPLATE, calibration: str = "softmax",
                   background_label: str | None = None, calibration_bias: float = 0.0) -> HTSATClapTextQuery:
        """`text_query_model(self, ...)`: this model asked about `candidate_labels`, as a sound event detector."""
        query = text_query_model(self, candidate_labels, tokenizer, hypothesis_template, calibration,
                                 background_label, calibration_bias)
        query.query = dict(candidate_labels=list(candidate_labels), hypothesis_template=hypothesis_template,
                           calibration=calibration, background_label=background_label,
                           calibration_bias=calibration_bias)
        return query

    # -------------------------------------------------------------------------------------------------- time
    def frame_step_seconds(self, num_frames: int) -> float:
        """Seconds of one step for an input of `num_frames` frames (as `HTSATForSoundEventDetection`'s)."""
        return step_seconds(self.config.audio_config, num_frames)

    def total_steps(self, num_frames: int) -> int:
        """Steps of the stitched grid for an input of `num_frames` frames."""
        return total_steps(self.config.audio_config, num_frames)

    def stitch_window_steps(self, step_values: torch.Tensor, starts, num_frames: int) -> torch.Tensor:
        """([batch,] windows, steps, values) per window -> ([batch,] total steps, values), as
        `HTSATForSoundEventDetection.stitch_window_steps` stitches frame logits."""
        return stitch_window_steps(self.config.audio_config, step_values, starts, num_frames)

    def token_step_logits(self, tokens: torch.Tensor, text_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, tokens, hidden) final tokens of n windows -> their step logits (n, steps, phrases) against normalised
        `text_embeds`, and the normalised projected step embeddings (n, steps, projection_dim)."""
        steps = self.project_audio(self.step_embeddings(tokens))
        return steps @ text_embeds.t() * self.logit_scale(), steps

    def pooled_logits(self, pooled: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(..., hidden) pooled embeddings (the mean tokens of a window, or of all an input's windows) -> clip logits
        (..., phrases): exp(logit_scale_a) * cos(projected audio, text)."""
        return self.project_audio(pooled) @ text_embeds.t() * self.logit_scale()

    def step_similarity(self, input_features: torch.Tensor, text_embeds: torch.Tensor) -> HTSATClapStepOutput:
        """Per-step and clip logits of `input_features` (batch, frames, mel) against normalised `text_embeds`
        (phrases, projection_dim) (`get_text_features(...).pooler_output`); see the module's definitions."""
        tokens, starts, _ = self.encode_audio(input_features)
        batch, windows = tokens.shape[:2]
        step_logits, steps = self.token_step_logits(tokens.flatten(0, 1), text_embeds)  # (batch * windows, steps, .)
        step_logits = step_logits.view(batch, windows, steps.shape[1], -1)
        steps = steps.view(batch, windows, *steps.shape[1:])
        window_logits = self.pooled_logits(tokens.mean(dim=2), text_embeds)
        audio_embeds = self.project_audio(tokens.mean(dim=(1, 2)))
        scale = self.logit_scale()
        num_frames = input_features.shape[1]
        if num_frames <= self.config.audio_config.image_frames:
            step_logits, steps = step_logits[:, 0], steps[:, 0]
        else:
            step_logits = self.stitch_window_steps(step_logits, starts, num_frames)
            steps = self.stitch_window_steps(steps, starts, num_frames)
        return HTSATClapStepOutput(step_logits=step_logits, logits_per_audio=audio_embeds @ text_embeds.t() * scale,
                                   step_embeds=steps, audio_embeds=audio_embeds, window_logits=window_logits)


# ------------------------------------------------------------------------------------------ text queries as SED
@dataclass
class TextQueryOutput(ModelOutput):
    """What `HTSATForSoundEventDetection` returns, for phrases: clip `logits` (batch, labels) and `frame_logits`
    (batch, steps, labels), after the calibration (see `text_query_model`)."""

    logits: torch.Tensor | None = None
    frame_logits: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None


class HTSATClapTextQuery(nn.Module):
    """
    An `HTSATClapModel` asked about fixed phrases, with the interface the SED pipeline, `Annotator` and
    `LiveDetector` use for an `HTSATForSoundEventDetection`: `config` (the audio tower's `HTSATConfig` with
    `id2label` = the labels and the calibration's `problem_type`), `forward(input_features)` -> `logits`,
    `frame_logits`; `frame_step_seconds`, `total_steps`, `stitch_window_steps`, `htsat` (the audio tower). Build it
    with `text_query_model`.
    """

    def __init__(self, clap_model: HTSATClapModel, labels: list[str], text_embeds: torch.Tensor, calibration: str,
                 background: str | None, background_embed: torch.Tensor | None, bias: float):
        super().__init__()
        self.clap = clap_model
        self.htsat = clap_model.audio_model
        self.calibration = calibration
        self.background = background
        self.bias = float(bias)
        self.register_buffer("text_embeds", text_embeds, persistent=False)
        self.register_buffer("background_embed", background_embed, persistent=False)
        config = copy.deepcopy(clap_model.config.audio_config)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: index for index, label in enumerate(labels)}
        config.problem_type = "single_label_classification" if calibration == "softmax" else "multi_label_classification"
        # per-step outputs on the token-semantic head's step grid (`classifier` is that head's slot), so the annotator
        # and the live detector run the steps as for an `HTSATForSoundEventDetection`
        config.use_token_semantic_head = True
        self.config = config
        self.loading_info = getattr(clap_model, "loading_info", None)
        self.name_or_path = getattr(clap_model, "name_or_path", None)

    @property
    def dtype(self) -> torch.dtype:
        return self.clap.dtype

    @property
    def device(self) -> torch.device:
        return self.clap.device

    def calibrate(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., phrases [+ background]) logits exp(s) * cos -> the logits the pipeline scores: for "softmax" as they
        are (the background phrase, if any, is the last label); for "sigmoid" the phrases' logits minus the background
        phrase's (or minus nothing), plus `bias`."""
        if self.calibration == "softmax":
            return logits
        if self.background is not None:
            return logits[..., :-1] - logits[..., -1:] + self.bias
        return logits + self.bias

    def phrase_embeds(self) -> torch.Tensor:
        """(phrases [+ background], projection_dim) the normalised text embeddings the audio is compared with."""
        return self.text_embeds if self.background_embed is None else torch.cat(
            [self.text_embeds, self.background_embed])

    def forward(self, input_features: torch.Tensor, **kwargs) -> TextQueryOutput:
        output = self.clap.step_similarity(input_features, self.phrase_embeds())
        return TextQueryOutput(logits=self.calibrate(output.logits_per_audio),
                               frame_logits=self.calibrate(output.step_logits), pooler_output=output.audio_embeds)

    # what the annotator and the live detector run on windows they encode themselves (`htsat.encode_images`)
    def classifier(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, tokens, hidden) final tokens of n windows -> (n, steps, labels) calibrated step logits, in the slot of
        `HTSATForSoundEventDetection.classifier` (the same `token_step_logits` as `forward`)."""
        return self.calibrate(self.clap.token_step_logits(tokens, self.phrase_embeds())[0])

    def clip_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """(..., hidden) pooled embeddings (a window's mean tokens, or the mean over an input's windows) -> calibrated
        clip logits (..., labels), as `forward`'s `logits` (a window's clip logits are not the mean of its step
        logits: the projection is not linear)."""
        return self.calibrate(self.clap.pooled_logits(pooled, self.phrase_embeds()))

    def joint_embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        """(..., hidden) pooled embeddings -> (..., projection_dim) normalised audio embeddings in CLAP's joint space
        (what `get_audio_features` returns), comparable with `get_text_features`."""
        return self.clap.project_audio(pooled)

    def frame_step_seconds(self, num_frames: int) -> float:
        return self.clap.frame_step_seconds(num_frames)

    def total_steps(self, num_frames: int) -> int:
        return self.clap.total_steps(num_frames)

    def stitch_window_steps(self, step_values, starts, num_frames: int) -> torch.Tensor:
        return self.clap.stitch_window_steps(step_values, starts, num_frames)


def check_phrases(phrases: str | Sequence[str], what: str = "candidate_labels") -> list[str]:
    """One phrase or several as a list; a ValueError naming `what` unless they are distinct non-empty strings."""
    phrases = [phrases] if isinstance(phrases, str) else list(phrases)
    if not phrases or not all(isinstance(p, str) and p.strip() for p in phrases) or len(set(phrases)) != len(phrases):
        raise ValueError(f"{what} must be distinct non-empty phrases, got {phrases!r}.")
    return phrases


def phrase_embeddings(clap_model: HTSATClapModel, phrases: Sequence[str], tokenizer: Any = None,
                      hypothesis_template: str = DEFAULT_TEMPLATE) -> torch.Tensor:
    """(phrases, projection_dim) normalised text embeddings (`get_text_features(...).pooler_output`, no gradients) of
    the phrases, each formatted with `hypothesis_template`. `tokenizer`: CLAP's; default: the one saved with the
    model (`name_or_path`)."""
    if "{}" not in hypothesis_template:
        raise ValueError(f"hypothesis_template must contain '{{}}' where the phrase goes, got {hypothesis_template!r}.")
    if tokenizer is None:
        from transformers import AutoTokenizer

        source = getattr(clap_model, "name_or_path", None)
        if not source:
            raise ValueError("Pass the CLAP tokenizer (tokenizer=...): the model was not loaded from a folder.")
        tokenizer = AutoTokenizer.from_pretrained(source)
    inputs = tokenizer([hypothesis_template.format(p) for p in phrases], padding=True, return_tensors="pt")
    inputs = inputs.to(clap_model.device)
    with torch.no_grad():
        return clap_model.get_text_features(input_ids=inputs["input_ids"],
                                            attention_mask=inputs.get("attention_mask")).pooler_output


def text_query_model(clap_model: HTSATClapModel, phrases: list[str], tokenizer: Any = None,
                     hypothesis_template: str = DEFAULT_TEMPLATE, calibration: str = "softmax",
                     background: str | None = None, bias: float = 0.0) -> HTSATClapTextQuery:
    """
    `clap_model` asked about `phrases` (each formatted with `hypothesis_template`, Transformers' argument), as a
    module the SED machinery uses like an `HTSATForSoundEventDetection` whose labels are the phrases.

    Calibration (how step and clip logits l = exp(logit_scale_a) * cos(audio, text) become scores):
    - "softmax" (default; problem_type single-label): a softmax across the phrases per step, as CLAP's zero-shot
      scores are across candidate labels, capped by the window's own zero-shot score (the SED rule for single-label
      models, `scores.frame_scores`). Scores say which phrase fits a step best among those given, not whether any
      fits: add a `background` phrase (e.g. "silence", "background noise") to take the steps that fit none; it is
      then the last label, and its events are reported under its phrase.
    - "sigmoid" (multi-label): sigmoid(l + bias) per phrase, independently; with a `background` phrase
      sigmoid(l - l_background + bias), the probability that the phrase beats the background in a two-way softmax.
      Without a background phrase l alone is uncalibrated (cosines of unrelated sounds are rarely below 0), so choose
      `bias` (or the threshold) for your checkpoint.
    `tokenizer`: CLAP's (RoBERTa) tokenizer; default: the one saved with the model (`name_or_path`).
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}.")
    phrases = check_phrases(phrases)
    if background is not None and background in phrases:
        raise ValueError(f"The background phrase {background!r} is also a candidate label.")
    embeds = phrase_embeddings(clap_model, phrases + ([background] if background is not None else []), tokenizer,
                               hypothesis_template)
    text_embeds = embeds[: len(phrases)]
    background_embed = embeds[len(phrases):] if background is not None else None
    labels = phrases + ([background] if background is not None and calibration == "softmax" else [])
    if calibration == "softmax" and background is not None:
        text_embeds, background_embed = embeds, None  # the background is a label like the phrases
    return HTSATClapTextQuery(clap_model, labels, text_embeds, calibration,
                              background if calibration == "sigmoid" else None, background_embed, bias)


HTSATClapModel.register_for_auto_class("AutoModel")

__all__ = ["CALIBRATIONS", "DEFAULT_TEMPLATE", "HTSATClapModel", "HTSATClapPreTrainedModel", "HTSATClapProjection",
           "HTSATClapTextQuery", "check_phrases", "phrase_embeddings", "text_query_model"]
