"""HTS-AT: a hierarchical token-semantic audio transformer (Chen et al., ICASSP 2022) for Hugging Face Transformers.

Path of a clip: log-mel (batch, frames, mel) -> BatchNorm over mel bins -> (training) SpecAugment and mixup ->
the frames stretched or windowed to the model's 10-s windows -> each window folded into a 256 x 256 image
(time -> frequency -> window order) -> Swin stages with shifted-window attention and patch merging -> final
LayerNorm -> token-semantic Conv2d head: per-class logits over 32 time steps per window, averaged into clip logits.

This file is the model's definition only, written as Transformers' Swin and CLAP audio models are: one `forward` per
module, attention through Transformers' attention interface, hidden states and attentions recorded by output hooks
(`_can_record_outputs`). The layers marked with `use_kernel_forward_from_hub` may get a faster forward for CPU
inference swapped in by Transformers' `kernels` mechanism (the `htsat_hf` package ships one, `htsat_hf.engine`);
where none is attached (a remote-code folder without the package, or the engine switched off) these forwards run.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.integrations import use_kernel_forward_from_hub
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput, SequenceClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_htsat import HTSATConfig
from .time_axis import step_seconds, stitch_window_steps, total_steps, window_layout, window_start_frames

logger = logging.get_logger(__name__)

SHIFT_MASK_VALUE = -100.0  # the original's additive mask between tokens of different shifted regions

# Faster forwards for the layers marked below with `faster_forward`, swapped in by Transformers' `kernels` mechanism
# (`use_kernel_forward_from_hub`, `kernelize`): a package that ships some (htsat_hf does: `htsat_hf.engine`) registers a
# kernel mapping for their names, adds the names to KERNELIZED_LAYERS and may add a callable to POST_INIT_HOOKS that
# attaches them to every model built. A remote-code folder used without the package has neither: `kernelize` then
# leaves these layers alone and this file's forwards run.
KERNELIZED_LAYERS: set[str] = set()
POST_INIT_HOOKS: list[Callable[[PreTrainedModel], None]] = []


def kernelized(module: nn.Module) -> bool:
    """Whether a faster forward is registered for this marked layer (kernels' `condition` for `kernelize`)."""
    return type(module).kernel_layer_name in KERNELIZED_LAYERS


def faster_forward(name: str):
    """`use_kernel_forward_from_hub(name)`, for the layers whose forward a registered package may replace."""
    return use_kernel_forward_from_hub(name, condition=kernelized)


@contextlib.contextmanager
def quiet_progress_bars():
    """Transformers' progress bars off for the duration, then as they were (the Hub's too, which its switch shares)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

    was_on, hub_was_off = logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()
        if hub_was_off:
            disable_progress_bars()



# ------------------------------------------------------------------------------------------------------- outputs
@dataclass
class HTSATModelOutput(ModelOutput):
    """
    last_hidden_state: (batch, windows * tokens, hidden_size) final LayerNorm'ed tokens. One window (64 tokens of an
        8 x 8 grid, row-major, rows = frequency chunks) for inputs of up to one window; windows follow in time order.
    pooler_output: (batch, hidden_size) mean of all tokens: the clip's latent embedding.
    hidden_states: per stage (after patch embedding and after each stage), when requested.
    attentions: per stage, the attention weights of its last block, when requested.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class HTSATSoundEventDetectionOutput(ModelOutput):
    """
    loss: clip-level loss (with `labels`) plus frame-level BCE (with `frame_labels`).
    logits: (batch, num_labels) clip logits: the mean of `frame_logits` over time.
    frame_logits: (batch, steps, num_labels) token-semantic logits over time: 32 steps per 10-s window
        (`model.frame_step_seconds(num_frames)` gives a step's duration in seconds).
    pooler_output: (batch, hidden_size) latent clip embedding.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    frame_logits: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ------------------------------------------------------------------------------------------ spectrogram image
def fold_spectrogram(features: torch.Tensor, config: HTSATConfig) -> torch.Tensor:
    """
    (batch, 1, frames, mel) -> (batch, 1, spec_size, spec_size). Fewer frames than the image holds are stretched
    bicubically first, as the original does (1001 -> 1024). The time axis is cut into `freq_ratio` chunks stacked
    along frequency: time -> frequency -> window order.
    """
    batch, channels, frames, mel_bins = features.shape
    target = config.image_frames
    if (torch.compiler.is_exporting() and not frames > target) or frames < target:
        # exported for lengths up to one image, the stretch is always in the graph: at exactly `target` frames it is
        # the identity (align_corners samples the input's own points)
        features = F.interpolate(features, (target, mel_bins), mode="bicubic", align_corners=True)
    elif frames > target:
        raise ValueError(f"fold_spectrogram got {frames} frames; at most {target} fit one image.")
    ratio = config.freq_ratio
    image = features.permute(0, 1, 3, 2).reshape(batch, channels, mel_bins, ratio, target // ratio)
    return image.permute(0, 1, 3, 2, 4).reshape(batch, channels, ratio * mel_bins, target // ratio)


@faster_forward("HTSATSpectrogramFold")
class HTSATSpectrogramFold(nn.Module):
    """`fold_spectrogram` as a layer (no weights): mel-normalised window features -> the model's square images."""

    def __init__(self, config: HTSATConfig):
        super().__init__()
        self.config = config

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return fold_spectrogram(features, self.config)


def spec_augment(features: torch.Tensor, config: HTSATConfig) -> torch.Tensor:
    """Zero random time and frequency stripes of (batch, 1, frames, mel), independently per example (torchaudio)."""
    for _ in range(config.num_time_masks):
        features = torchaudio.functional.mask_along_axis_iid(features, config.time_mask_width, 0.0, axis=2)
    for _ in range(config.num_freq_masks):
        features = torchaudio.functional.mask_along_axis_iid(features, config.freq_mask_width, 0.0, axis=3)
    return features



@faster_forward("HTSATPatchEmbeddings")
class HTSATPatchEmbeddings(nn.Module):
    """Conv2d patches of the spectrogram image, flattened to tokens and LayerNorm'ed."""

    def __init__(self, config: HTSATConfig):
        super().__init__()
        self.proj = nn.Conv2d(
            1,
            config.embed_dim,
            kernel_size=config.patch_size,
            stride=config.patch_stride,
            padding=config.patch_padding,
        )
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(n, 1, spec, spec) -> (n, grid * grid, embed_dim) tokens, row-major (rows = frequency)."""
        return self.norm(self.proj(image).flatten(2).transpose(1, 2))


# --------------------------------------------------------------------------------------------------- Swin parts
def window_partition(tokens: torch.Tensor, window: int) -> torch.Tensor:
    """(batch, height, width, channels) -> (batch, windows, window * window, channels)."""
    batch, height, width, channels = tokens.shape
    tokens = tokens.view(batch, height // window, window, width // window, window, channels)
    return tokens.permute(0, 1, 3, 2, 4, 5).reshape(batch, -1, window * window, channels)


def window_reverse(windows: torch.Tensor, window: int, grid: int) -> torch.Tensor:
    """(batch, windows, window * window, channels) -> (batch, grid, grid, channels): `window_partition` undone."""
    batch, _, _, channels = windows.shape
    windows = windows.view(batch, grid // window, grid // window, window, window, channels)
    return windows.permute(0, 1, 3, 2, 4, 5).reshape(batch, grid, grid, channels)


def relative_position_index(window: int) -> torch.Tensor:
    """(window^2 * window^2,) index into the ((2W-1)^2, heads) relative position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return (relative[..., 0] * (2 * window - 1) + relative[..., 1]).flatten()


def shifted_window_mask(grid: int, window: int, shift: int) -> torch.Tensor:
    """(windows, window^2, window^2) additive mask keeping attention inside each region of a cyclic shift."""
    regions = torch.zeros(1, grid, grid, 1)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bounds:
        for cols in bounds:
            regions[:, rows, cols, :] = label
            label += 1
    region_windows = window_partition(regions, window).reshape(-1, window * window)
    different = region_windows[:, None, :] != region_windows[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, SHIFT_MASK_VALUE)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    weights_shape: tuple[int, ...] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention by matmul and softmax, for Transformers' attention interface: (windows, heads, tokens, head_dim)
    inputs, an additive mask -> context (windows, tokens, heads, head_dim) and the softmax weights. The weights are
    reshaped to `weights_shape` (e.g. (batch, windows, heads, tokens, tokens)) *before* they are used, so that the
    tensor returned is the one in the graph: gradients reach it (attention attribution)."""
    weights = (torch.matmul(query * scaling, key.transpose(-2, -1)) + attention_mask).softmax(dim=-1)
    if weights_shape is not None:
        weights = weights.view(weights_shape)
    used = F.dropout(weights, dropout, module.training).reshape(query.shape[0], *weights.shape[-3:])
    return torch.matmul(used, value).transpose(1, 2), weights


class HTSATWindowAttention(nn.Module):
    """
    Multi-head self-attention inside windows with a learned relative position bias, through Transformers' attention
    interface: `config._attn_implementation` ("sdpa" by default, "eager", or a registered function) decides, so
    `set_attn_implementation` takes effect; attention weights are returned by the eager path.
    """

    def __init__(self, config: HTSATConfig, dim: int, num_heads: int, window: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.window = window
        self.is_causal = False
        self.qkv = nn.Linear(dim, dim * 3, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(config.hidden_dropout_prob)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, tokens, tokens) bias from the learned table."""
        tokens = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index]
        return bias.view(tokens, tokens, self.num_heads).permute(2, 0, 1)

    def forward(
        self, windows: torch.Tensor, shift_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """windows: (batch, num_windows, tokens, dim); shift_mask: (num_windows, tokens, tokens) or None.
        Returns the projected context (batch, num_windows, tokens, dim) and, with `output_attentions`, the weights
        (batch, num_windows, heads, tokens, tokens)."""
        batch, num_windows, tokens, dim = windows.shape
        count = batch * num_windows
        mask = self.relative_position_bias().unsqueeze(0)  # (1, heads, tokens, tokens)
        if shift_mask is not None:  # (num_windows, heads, tokens, tokens), repeated over the batch
            mask = mask + shift_mask.to(mask.dtype).unsqueeze(1)
            mask = mask.expand(batch, *mask.shape).reshape(count, *mask.shape[1:])
        qkv = self.qkv(windows.reshape(count, tokens, dim)).view(count, tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (windows, heads, tokens, head_dim) each
        attention = eager_attention_forward
        if not output_attentions:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        context, weights = attention(
            self, query, key, value, mask.contiguous(),
            dropout=self.config.attention_probs_dropout_prob if self.training else 0.0,
            scaling=self.scale,
            weights_shape=(batch, num_windows, self.num_heads, tokens, tokens),
        )
        context = self.proj_drop(self.proj(context.reshape(count, tokens, dim)))
        return context.view(batch, num_windows, tokens, dim), (weights if output_attentions else None)


class HTSATDropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per example during training."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden
        keep = 1.0 - self.drop_prob
        shape = (hidden.shape[0],) + (1,) * (hidden.ndim - 1)
        return hidden * hidden.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class HTSATMlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2, with dropout."""

    def __init__(self, config: HTSATConfig, dim: int):
        super().__init__()
        hidden = int(dim * config.mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(hidden)))))


class HTSATSwinBlock(GradientCheckpointingLayer):
    """Pre-norm Swin block: norm1 -> cyclic shift -> window attention (relative position bias, shift mask) -> shift
    back -> residual with stochastic depth; norm2 -> MLP -> residual with stochastic depth."""

    def __init__(self, config: HTSATConfig, stage: int, block: int, drop_path: float):
        super().__init__()
        dim = config.hidden_sizes[stage]
        self.grid = config.stage_grid_size(stage)
        self.window = config.stage_window_size(stage)
        self.shift = self.window // 2 if (block % 2 == 1 and self.grid > self.window) else 0
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = HTSATWindowAttention(config, dim, config.num_heads[stage], self.window)
        self.drop_path = HTSATDropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = HTSATMlp(config, dim)
        self.register_buffer("shift_mask", self.create_shift_mask(), persistent=False)

    def create_shift_mask(self) -> torch.Tensor | None:
        return shifted_window_mask(self.grid, self.window, self.shift) if self.shift else None

    def forward(
        self, hidden: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden: (batch, grid * grid, dim) tokens in row-major grid order."""
        batch, tokens, dim = hidden.shape
        grid = self.norm1(hidden).view(batch, self.grid, self.grid, dim)
        if self.shift:
            grid = torch.roll(grid, shifts=(-self.shift, -self.shift), dims=(1, 2))
        attended, weights = self.attn(window_partition(grid, self.window), self.shift_mask, output_attentions)
        grid = window_reverse(attended, self.window, self.grid)
        if self.shift:
            grid = torch.roll(grid, shifts=(self.shift, self.shift), dims=(1, 2))
        hidden = hidden + self.drop_path(grid.reshape(batch, tokens, dim))
        return hidden + self.drop_path(self.mlp(self.norm2(hidden))), weights


@faster_forward("HTSATPatchMerging")
class HTSATPatchMerging(nn.Module):
    """Concatenates each 2 x 2 neighbourhood of tokens (4C), LayerNorm, linear to 2C: halves the grid."""

    def __init__(self, config: HTSATConfig, dim: int, grid: int):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * dim, eps=config.layer_norm_eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, _, dim = hidden.shape
        grid = hidden.view(batch, self.grid, self.grid, dim)
        merged = torch.cat(
            [grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], dim=-1
        ).view(batch, -1, 4 * dim)
        return self.reduction(self.norm(merged))


@faster_forward("HTSATStage")
class HTSATStage(nn.Module):
    """Swin blocks at one resolution (alternating plain and shifted windows), then patch merging (all but the last
    stage). Returns the tokens and, with `output_attentions`, the attention weights of its last block."""

    def __init__(self, config: HTSATConfig, stage: int, drop_paths: list[float]):
        super().__init__()
        self.blocks = nn.ModuleList(
            [HTSATSwinBlock(config, stage, block, drop_paths[block]) for block in range(config.depths[stage])]
        )
        last = stage == config.num_stages - 1
        self.downsample = (
            None if last else HTSATPatchMerging(config, config.hidden_sizes[stage], config.stage_grid_size(stage))
        )

    def forward(
        self, hidden: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        weights = None
        for block in self.blocks:
            hidden, weights = block(hidden, output_attentions)
        if self.downsample is not None:
            hidden = self.downsample(hidden)
        return hidden, weights


# --------------------------------------------------------------------------------------------- pretrained base
class HTSATPreTrainedModel(PreTrainedModel):
    config: HTSATConfig
    config_class = HTSATConfig
    base_model_prefix = "htsat"
    main_input_name = "input_features"
    input_modalities = ("audio",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["HTSATStage"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _keys_to_ignore_on_load_unexpected = [r"relative_position_index", r"attn_mask", r"shift_mask"]
    # hidden states: the patch embedding's tokens (a stage's input), then each stage's output; attentions: each
    # stage's last block's weights (batch, windows, heads, tokens, tokens)
    _can_record_outputs = {
        "hidden_states": OutputRecorder(HTSATStage, index=0, capture_initial_hidden_state=True),
        "attentions": OutputRecorder(HTSATStage, index=1, capture_initial_hidden_state=False),
    }

    def post_init(self):
        """As `PreTrainedModel.post_init`, then the registered POST_INIT_HOOKS (see KERNELIZED_LAYERS)."""
        super().post_init()
        for hook in POST_INIT_HOOKS:
            hook(self)

    def _init_weights(self, module: nn.Module) -> None:
        """As the original: truncated normal (std 0.02) for linear layers and the bias tables, PyTorch's default for
        convolutions, identity norms. Non-persistent buffers are rebuilt (models are created on the meta device)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, HTSATWindowAttention):
            init.trunc_normal_(module.relative_position_bias_table, std=std)
            init.copy_(module.relative_position_index, relative_position_index(module.window))
        elif isinstance(module, HTSATSwinBlock) and module.shift_mask is not None:
            init.copy_(module.shift_mask, module.create_shift_mask())

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves weights and config with an `auto_map` for every HTS-AT class, so the folder also loads with
        `trust_remote_code=True` where `htsat_hf` is not installed. (No "Writing model shards" bar for one file.)"""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        with quiet_progress_bars():
            return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, keeping Transformers' load report on the model (`loading_info`, see
        `with_loading_info`); from a local folder without the "Loading weights" bar, which for a model of this size
        flashes by in a fraction of a second (downloads keep their bars)."""
        load = super().from_pretrained
        if not os.path.isdir(str(pretrained_model_name_or_path)):
            return with_loading_info(load, pretrained_model_name_or_path, *args, **kwargs)
        with quiet_progress_bars():
            return with_loading_info(load, pretrained_model_name_or_path, *args, **kwargs)

    def train(self, mode: bool = True):
        """As `nn.Module.train`. Training changes the weights, so the load report (`loading_info`) no longer describes
        them and is dropped: a head fine-tuned from `ignore_mismatched_sizes=True` is then usable for inference."""
        if mode:
            self.__dict__.pop("loading_info", None)
        return super().train(mode)


def with_loading_info(load, *args, **kwargs):
    """
    Runs `load` (a `PreTrainedModel.from_pretrained`) with `output_loading_info=True` and keeps the report on the model
    as `model.loading_info`: {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}, after the model's
    documented `_keys_to_ignore_on_load_*` patterns. Transformers only logs it; `inference_checks.check_weights_loaded`
    refuses a model whose weights were not all loaded. Returns what `from_pretrained` returns for the caller's own
    `output_loading_info`.
    """
    wanted = kwargs.pop("output_loading_info", False)
    model, loading_info = load(*args, output_loading_info=True, **kwargs)
    model.loading_info = loading_info
    return (model, loading_info) if wanted else model


# -------------------------------------------------------------------------------------------------- backbone
class HTSATModel(HTSATPreTrainedModel):
    """HTS-AT backbone: log-mel features -> final LayerNorm'ed tokens and the pooled latent embedding."""

    def __init__(self, config: HTSATConfig):
        super().__init__(config)
        self.mel_batch_norm = nn.BatchNorm2d(config.num_mel_bins)
        self.fold = HTSATSpectrogramFold(config)
        self.patch_embed = HTSATPatchEmbeddings(config)
        blocks = sum(config.depths)  # stochastic depth rising linearly from 0 to drop_path_rate over all blocks
        drop_paths = [config.drop_path_rate * i / max(blocks - 1, 1) for i in range(blocks)]
        self.stages = nn.ModuleList()
        for stage, depth in enumerate(config.depths):
            first = sum(config.depths[:stage])
            self.stages.append(HTSATStage(config, stage, drop_paths[first : first + depth]))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def freeze_feature_encoder(self) -> None:
        """Freezes the mel BatchNorm and the patch embedding (the model's acoustic front end)."""
        for module in (self.mel_batch_norm, self.patch_embed):
            for parameter in module.parameters():
                parameter.requires_grad = False

    # -- time axis
    def window_layout(self, num_frames: int) -> tuple[list[int], int]:
        """Start frames of the windows an input of `num_frames` frames is cut into, and the frames per window."""
        return window_layout(self.config, num_frames)

    def normalize_features(self, input_features: torch.Tensor, mixup_lambda: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, frames, mel) -> (batch, 1, frames, mel): mel BatchNorm, then in training SpecAugment and mixup."""
        if input_features.ndim != 3 or input_features.shape[-1] != self.config.num_mel_bins:
            raise ValueError(
                f"input_features must have shape (batch, frames, {self.config.num_mel_bins}), got "
                f"{tuple(input_features.shape)}; compute them with HTSATFeatureExtractor."
            )
        features = input_features.unsqueeze(1).transpose(1, 3)
        features = self.mel_batch_norm(features).transpose(1, 3)
        if self.training and self.config.spec_augment:
            features = spec_augment(features, self.config)
        if mixup_lambda is not None:
            lam = mixup_lambda.to(features.dtype).view(-1, 1, 1, 1)
            features = features * lam + features.flip(0) * (1.0 - lam)
        return features

    def encode_windows(
        self, input_features: torch.Tensor, mixup_lambda: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """
        Returns tokens (batch, windows, tokens, hidden) after the final LayerNorm, the windows' start frames and the
        frames per window. In training, inputs longer than one image are randomly cropped to one image, as the
        original does. Hidden states and attentions are recorded by the calling `forward` (`_can_record_outputs`).
        """
        features = self.normalize_features(input_features, mixup_lambda)
        batch, _, frames, mel_bins = features.shape
        if self.training and frames > self.config.image_frames:
            start = int(torch.randint(0, frames - self.config.image_frames + 1, ()).item())
            features = features[:, :, start : start + self.config.image_frames]
            frames = self.config.image_frames
        starts, window_frames = window_start_frames(self.config, frames)
        if frames > self.config.image_frames:  # windows gathered by index: the graph depends on the length only
            index = starts.to(features.device)[:, None] + torch.arange(window_frames, device=features.device)
            features = features[:, :, index].transpose(1, 2).reshape(-1, 1, window_frames, mel_bins)
        hidden = self.encode_images(self.fold(features), output_attentions)
        return hidden.view(batch, -1, hidden.shape[1], hidden.shape[2]), starts, window_frames

    def window_images(self, window_features: torch.Tensor) -> torch.Tensor:
        """(n, frames, mel) features of n windows (at most one image of frames each) -> (n, 1, spec, spec) images,
        mel-normalised and folded exactly as `encode_windows` does (for callers that pack windows themselves)."""
        return self.fold(self.normalize_features(window_features))

    def encode_images(self, images: torch.Tensor, output_attentions: bool = False) -> torch.Tensor:
        """(n, 1, spec, spec) folded spectrogram images -> final LayerNorm'ed tokens (n, tokens, hidden)."""
        hidden = self.patch_embed(images)
        for stage in self.stages:
            hidden, _ = stage(hidden, output_attentions)
        return self.norm(hidden)

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        input_features: torch.Tensor,
        mixup_lambda: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> HTSATModelOutput:
        tokens, _, _ = self.encode_windows(input_features, mixup_lambda, wants_attentions(self, output_attentions))
        last_hidden_state = tokens.flatten(1, 2)
        return HTSATModelOutput(last_hidden_state=last_hidden_state, pooler_output=last_hidden_state.mean(dim=1))


def wants_attentions(model: PreTrainedModel, output_attentions: bool | None) -> bool:
    """The call's `output_attentions`, else the config's."""
    return bool(model.config.output_attentions if output_attentions is None else output_attentions)


# ------------------------------------------------------------------------------------------------------ heads
def token_map_by_time(tokens: torch.Tensor, grid: int, freq_ratio: int) -> torch.Tensor:
    """Final tokens (n, grid * grid, hidden) -> token map (n, hidden, grid // freq_ratio, freq_ratio * grid): the
    folded image's `freq_ratio` time chunks side by side again, so that the last axis is the time steps in order."""
    n, _, hidden = tokens.shape
    groups = grid // freq_ratio
    token_map = tokens.transpose(1, 2).reshape(n, hidden, freq_ratio, groups, grid)
    return token_map.permute(0, 1, 3, 2, 4).reshape(n, hidden, groups, freq_ratio * grid)


@faster_forward("HTSATTokenSemanticHead")
class HTSATTokenSemanticHead(nn.Module):
    """Conv2d over the final token map rearranged to (frequency groups, time): per-class logits per time step."""

    def __init__(self, config: HTSATConfig):
        super().__init__()
        self.config = config
        self.grid = config.stage_grid_size(config.num_stages - 1)
        self.freq_groups = self.grid // config.freq_ratio
        self.conv = nn.Conv2d(
            config.hidden_size, config.num_labels, kernel_size=(self.freq_groups, 3), padding=(0, 1)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (n, grid * grid, hidden) -> step logits (n, token_steps, num_labels), in time order."""
        feature_map = token_map_by_time(tokens, self.grid, self.config.freq_ratio)
        return self.conv(feature_map).flatten(2).transpose(1, 2)  # (n, 1 group, steps) -> (n, steps, labels)


class HTSATPooledHead(nn.Module):
    """The paper's "H" ablation: mean-pooled tokens -> linear classifier."""

    def __init__(self, config: HTSATConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.dense(pooled)


class HTSATTimeAxisMixin:
    """Maps the token-semantic head's per-window steps onto the input's time axis (shared by both heads)."""

    def frame_step_seconds(self, num_frames: int) -> float:
        """Duration in seconds of one step of `frame_logits` for an input of `num_frames` feature frames."""
        return step_seconds(self.config, num_frames)

    def freeze_feature_encoder(self) -> None:
        self.htsat.freeze_feature_encoder()

    def encode_and_score(
        self,
        input_features: torch.Tensor,
        mixup_lambda: torch.Tensor | None = None,
        output_attentions: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Runs the backbone; returns its tokens (batch, windows, tokens, hidden) and the stitched token-semantic
        `frame_logits` (None for the pooled head)."""
        tokens, starts, window_frames = self.htsat.encode_windows(
            input_features, mixup_lambda, wants_attentions(self, output_attentions)
        )
        frame_logits = None
        if self.config.use_token_semantic_head:
            windowed = not self.training and input_features.shape[1] > self.config.image_frames
            num_frames = input_features.shape[1] if windowed else window_frames
            frame_logits = self.frame_logits_from_tokens(tokens, starts, num_frames)
        return tokens, frame_logits

    def frame_logits_from_tokens(self, tokens: torch.Tensor, starts: torch.Tensor | list[int], num_frames: int
                                 ) -> torch.Tensor:
        """tokens (batch, windows, tokens, hidden) -> (batch, steps, labels) stitched over time."""
        batch, windows = tokens.shape[:2]
        step_logits = self.classifier(tokens.flatten(0, 1))  # (batch * windows, steps, labels)
        if num_frames <= self.config.image_frames:  # one window, on its own grid
            return step_logits
        return self.stitch_window_steps(step_logits.view(batch, windows, *step_logits.shape[1:]), starts, num_frames)

    def total_steps(self, num_frames: int) -> int:
        """Number of `frame_logits` steps for an input of `num_frames` feature frames."""
        return total_steps(self.config, num_frames)

    def stitch_window_steps(self, step_values: torch.Tensor, starts: torch.Tensor | list[int], num_frames: int
                            ) -> torch.Tensor:
        """Per-window step values ([batch,] windows, steps, labels), windows starting at frames `starts` of an input of
        `num_frames` frames -> ([batch,] total steps, labels) on one time grid of `frame_step_seconds` steps."""
        return stitch_window_steps(self.config, step_values, starts, num_frames)


class HTSATForSoundEventDetection(HTSATTimeAxisMixin, HTSATPreTrainedModel):
    """
    HTS-AT with the token-semantic head: clip `logits` and `frame_logits` over time. Inputs longer than one
    `clip_seconds` window are cut into overlapping windows (hop `long_input_hop_seconds`) covering every frame; the
    windows' step logits are stitched onto one time grid and the clip logits are their mean over time.
    """

    accepts_loss_kwargs = False

    def __init__(self, config: HTSATConfig):
        super().__init__(config)
        if not config.use_token_semantic_head:
            raise ValueError(
                "HTSATForSoundEventDetection needs the token-semantic head (use_token_semantic_head=True); use "
                "HTSATForAudioClassification for the pooled-head ablation."
            )
        self.htsat = HTSATModel(config)
        self.classifier = HTSATTokenSemanticHead(config)
        self.post_init()

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        input_features: torch.Tensor,
        labels: torch.Tensor | None = None,
        frame_labels: torch.Tensor | None = None,
        mixup_lambda: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> HTSATSoundEventDetectionOutput:
        """
        labels: clip labels (see `HTSATForAudioClassification`). frame_labels: (batch, steps, num_labels) strong
        labels on the `frame_logits` grid (0/1 or soft), trained with frame-level BCE added to the clip loss.
        """
        if frame_labels is not None and self.training and input_features.shape[1] > self.config.image_frames:
            raise ValueError(
                f"frame_labels need inputs of at most {self.config.image_frames} frames in training: longer inputs "
                f"({input_features.shape[1]} frames) are randomly cropped to one window, so the frame targets would "
                "not line up. Crop the audio in the data pipeline and shift the targets with it "
                "(htsat_hf.training.strong_labels.events_to_step_targets(offset_seconds=...))."
            )
        tokens, frame_logits = self.encode_and_score(input_features, mixup_lambda, output_attentions)
        logits = frame_logits.mean(dim=1)
        loss = None
        if labels is not None:
            loss = clip_loss(logits, labels, self.config)
        if frame_labels is not None:
            if frame_labels.shape != frame_logits.shape:
                raise ValueError(
                    f"frame_labels has shape {tuple(frame_labels.shape)} but frame_logits has "
                    f"{tuple(frame_logits.shape)}; build them on the model's step grid (frame_step_seconds)."
                )
            frame_loss = F.binary_cross_entropy_with_logits(frame_logits, frame_labels.to(frame_logits.dtype))
            loss = frame_loss if loss is None else loss + frame_loss
        return HTSATSoundEventDetectionOutput(
            loss=loss, logits=logits, frame_logits=frame_logits, pooler_output=tokens.mean(dim=(1, 2))
        )


class HTSATForAudioClassification(HTSATTimeAxisMixin, HTSATPreTrainedModel):
    """
    HTS-AT clip classifier. Returns pre-sigmoid / pre-softmax clip `logits`. With the token-semantic head (default)
    they are the time-averaged token-semantic logits, identical to `HTSATForSoundEventDetection`'s; the two share
    weight names, so one checkpoint loads into either.
    """

    accepts_loss_kwargs = False

    def __init__(self, config: HTSATConfig):
        super().__init__(config)
        self.htsat = HTSATModel(config)
        if config.use_token_semantic_head:
            self.classifier = HTSATTokenSemanticHead(config)
        else:
            self.classifier = HTSATPooledHead(config)
        self.post_init()

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        input_features: torch.Tensor,
        labels: torch.Tensor | None = None,
        mixup_lambda: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        """
        labels: multi-label (`problem_type="multi_label_classification"`): (batch, num_labels) multi-hot floats, BCE
        with logits. Single-label: (batch,) class indices or (batch, num_labels) soft targets (e.g. mixed by mixup),
        cross-entropy. Regression (num_labels == 1): MSE.
        """
        tokens, frame_logits = self.encode_and_score(input_features, mixup_lambda, output_attentions)
        if frame_logits is not None:
            logits = frame_logits.mean(dim=1)
        else:
            logits = self.classifier(tokens.mean(dim=(1, 2)))
        loss = clip_loss(logits, labels, self.config) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def clip_loss(logits: torch.Tensor, labels: torch.Tensor, config: HTSATConfig) -> torch.Tensor:
    """
    Mean clip loss; the labels decide, as in Transformers' models, and the choice is recorded in
    `config.problem_type` so that a saved model's pipeline applies softmax or sigmoid to match:
    - integer class ids (batch,): cross-entropy, single-label (also when the config said multi-label, as a converted
      AudioSet folder does: Transformers' audio-classification example passes class ids and has no flag to change it);
    - floats (batch, num_labels): BCE for multi-label, or cross-entropy on soft targets (mixup) for single-label;
    - one label and float targets: MSE (regression).
    """
    problem_type = config.problem_type
    class_ids = not labels.is_floating_point() and labels.ndim == 1
    if class_ids and config.num_labels > 1:
        problem_type = "single_label_classification"
    elif problem_type is None:
        problem_type = "regression" if config.num_labels == 1 else "multi_label_classification"
    if config.problem_type != problem_type:
        if config.problem_type is not None:
            logger.warning_once(
                f"Integer class ids as labels: training as single-label classification (cross-entropy); "
                f"problem_type changes from {config.problem_type!r} to {problem_type!r} in the config, so a saved "
                "model's pipeline applies softmax."
            )
        config.problem_type = problem_type
    if problem_type == "multi_label_classification":
        if labels.shape != logits.shape:
            raise ValueError(
                f"Multi-label targets must have shape {tuple(logits.shape)} (multi-hot), got {tuple(labels.shape)}; "
                "class ids (batch,) train a single-label model."
            )
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    if problem_type == "single_label_classification":
        if labels.ndim == 2 and labels.is_floating_point():
            return F.cross_entropy(logits, labels.to(logits.dtype))
        return F.cross_entropy(logits, labels.view(-1).long())
    if problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
    raise ValueError(f"Unknown problem_type {problem_type!r}.")


AUTO_MAP = {
    "AutoConfig": "configuration_htsat.HTSATConfig",
    "AutoModel": "modeling_htsat.HTSATModel",
    "AutoModelForAudioClassification": "modeling_htsat.HTSATForAudioClassification",
    "AutoModelForAudioFrameClassification": "modeling_htsat.HTSATForSoundEventDetection",
}

HTSATModel.register_for_auto_class("AutoModel")
HTSATForAudioClassification.register_for_auto_class("AutoModelForAudioClassification")
HTSATForSoundEventDetection.register_for_auto_class("AutoModelForAudioFrameClassification")

__all__ = [
    "HTSATForAudioClassification",
    "HTSATForSoundEventDetection",
    "HTSATModel",
    "HTSATPreTrainedModel",
    "with_loading_info",
]
