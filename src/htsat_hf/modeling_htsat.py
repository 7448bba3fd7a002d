"""HTS-AT: a hierarchical token-semantic audio transformer (Chen et al., ICASSP 2022) for Hugging Face Transformers.

Path of a clip: log-mel (batch, frames, mel) -> BatchNorm over mel bins -> (training) SpecAugment and mixup ->
the frames stretched or windowed to the model's 10-s windows -> each window folded into a 256 x 256 image
(time -> frequency -> window order) -> Swin stages with shifted-window attention and patch merging -> final
LayerNorm -> token-semantic Conv2d head: per-class logits over 32 time steps per window, averaged into clip logits.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn
from torch.nn.modules import module as torch_module
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput, SequenceClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .configuration_htsat import HTSATConfig
from .time_axis import (  # noqa: F401  (StepStitcher, long_input_hop_frames, window_starts: offered here as before)
    StepStitcher,
    grid_steps,
    long_input_hop_frames,
    stitch_on_grid,
    window_layout,
    window_start_frames,
    window_starts,
)
from .cpu_kernels import bias_separable, linear, linear_add_, linear_weights
from .native_kernels import (
    copy_rows,
    fold_image,
    fold_image_applies,
    fused_attention_applies,
    layer_norm,
    layer_norm_,
    merge_norm,
    merge_norm_applies,
    window_attention,
)

logger = logging.get_logger(__name__)

# CPU inference runs each Swin block on chunks of whole windows, sized so that the MLP's hidden layer holds about this
# many floats (3 MiB: the chunk's intermediate tensors stay in cache instead of streaming through memory).
CHUNK_HIDDEN_ELEMENTS = 2048 * 384
SHIFT_MASK_VALUE = -100.0  # the original's additive mask between tokens of different shifted regions


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


def fold_spectrogram(features: torch.Tensor, config: HTSATConfig) -> torch.Tensor:
    """
    (batch, 1, frames, mel) -> (batch, 1, spec_size, spec_size). Fewer frames than the image holds are stretched
    bicubically first, as the original does (1001 -> 1024). The time axis is cut into `freq_ratio` chunks stacked
    along frequency: time -> frequency -> window order.
    """
    batch, channels, frames, mel_bins = features.shape
    target = config.image_frames
    if not torch.compiler.is_exporting() and fold_image_applies(features, target, config.freq_ratio):
        return fold_image(features, target, config.freq_ratio)  # CPU inference: one pass of a native kernel
    if (torch.compiler.is_exporting() and not frames > target) or frames < target:
        # exported for lengths up to one image, the stretch is always in the graph: at exactly `target` frames it is
        # the identity (align_corners samples the input's own points)
        features = F.interpolate(features, (target, mel_bins), mode="bicubic", align_corners=True)
    elif frames > target:
        raise ValueError(f"fold_spectrogram got {frames} frames; at most {target} fit one image.")
    ratio = config.freq_ratio
    image = features.permute(0, 1, 3, 2).reshape(batch, channels, mel_bins, ratio, target // ratio)
    return image.permute(0, 1, 3, 2, 4).reshape(batch, channels, ratio * mel_bins, target // ratio)


def spec_augment(features: torch.Tensor, config: HTSATConfig) -> torch.Tensor:
    """Zero random time and frequency stripes of (batch, 1, frames, mel), independently per example (torchaudio)."""
    for _ in range(config.num_time_masks):
        features = torchaudio.functional.mask_along_axis_iid(features, config.time_mask_width, 0.0, axis=2)
    for _ in range(config.num_freq_masks):
        features = torchaudio.functional.mask_along_axis_iid(features, config.freq_mask_width, 0.0, axis=3)
    return features


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
        # With a channels-last weight the convolution writes (batch, height, width, channels), so the tokens come out
        # contiguous instead of through a transpose copy (on CPU the pair ran 10x faster at batch 4).
        weight = self.proj.weight.to(memory_format=torch.channels_last)  # not .contiguous(): a no-op for 1 channel
        patches = F.conv2d(image, weight, self.proj.bias, self.proj.stride, self.proj.padding)
        tokens = patches.flatten(2).transpose(1, 2)
        if cpu_inference_applies(self, tokens) and tokens.is_contiguous() and not has_forward_hooks(self.norm):
            return layer_norm_(tokens, self.norm)  # the convolution's output is ours: normalised in place
        return self.norm(tokens)


# --------------------------------------------------------------------------------------------------- Swin parts
def window_partition(tokens: torch.Tensor, window: int) -> torch.Tensor:
    """(batch, height, width, channels) -> (batch, windows, window * window, channels)."""
    batch, height, width, channels = tokens.shape
    tokens = tokens.view(batch, height // window, window, width // window, window, channels)
    return tokens.permute(0, 1, 3, 2, 4, 5).reshape(batch, -1, window * window, channels)


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


def shifted_window_order(grid: int, window: int, shift: int) -> torch.Tensor:
    """(grid^2,) flat grid positions of the tokens of each window after a cyclic shift by `shift`, in window order:
    `tokens[:, order]` does `torch.roll` and `window_partition` in one gather."""
    positions = torch.arange(grid * grid).view(1, grid, grid, 1)
    positions = torch.roll(positions, shifts=(-shift, -shift), dims=(1, 2))
    return window_partition(positions, window).flatten()


def gather_tokens(hidden: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """`hidden[:, order]` for (batch, tokens, dim): one gather of rows over the flattened batch, which PyTorch's CPU
    kernel runs 3x faster than `index_select` along dim 1 for a batch of more than one (4 x 4096 x 96: 0.44 vs 1.5 ms)."""
    batch, tokens, dim = hidden.shape
    if batch == 1:
        return hidden.index_select(1, order)
    rows = order + tokens * torch.arange(batch, device=order.device).unsqueeze(1)
    return hidden.reshape(batch * tokens, dim).index_select(0, rows.flatten()).view(batch, tokens, dim)


def cpu_inference_applies(module: nn.Module, hidden: torch.Tensor, output_attentions: bool = False) -> bool:
    """Whether a module takes its CPU inference path (on chunks of windows, or in place): eager CPU inference without
    gradients, attention weights or training-time randomness."""
    return not (
        module.training
        or output_attentions
        or torch.is_grad_enabled()
        or hidden.device.type != "cpu"
        or torch.compiler.is_compiling()
    )


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling `module` would run forward (pre-)hooks: its own or global ones."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
    )


def chunk_mask(mask: torch.Tensor, first: int, count: int, repeated: dict[int, torch.Tensor]) -> torch.Tensor:
    """The mask of `count` windows from window `first` on, from the per-image mask (windows per image or 1, heads,
    tokens, tokens): itself, a slice (a chunk inside one image) or a repeat over whole images (kept in `repeated`)."""
    per_image = mask.shape[0]
    if per_image == 1:
        return mask
    if count <= per_image:  # chunk sizes divide the windows per image, or are multiples of them
        start = first % per_image
        return mask[start : start + count]
    if count not in repeated:
        repeated[count] = mask.repeat(count // per_image, 1, 1, 1)
    return repeated[count]


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
    Multi-head self-attention inside windows, with a learned relative position bias; SDPA by default.

    The relative position bias and the shift mask are summed into one additive mask (windows or 1, heads, tokens,
    tokens). In inference it is cached (rebuilt when the bias table changes or moves); in training it is recomputed
    every call so the bias table gets its gradient. SDPA runs on 4-D (batch * windows, heads, tokens, head_dim) views
    of the qkv projection, which PyTorch's fused CPU kernel accepts (a 5-D layout falls back to the slow math path).
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
        self._mask_cache: tuple[tuple, dict[tuple, torch.Tensor]] | None = None  # (weights, masks by layout); unsaved

    def relative_position_bias(self) -> torch.Tensor:
        tokens = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index]
        return bias.view(tokens, tokens, self.num_heads).permute(2, 0, 1)

    def attention_mask(self, shift_mask: torch.Tensor | None, key_major: bool = False) -> torch.Tensor:
        """Relative position bias plus shift mask: (windows or 1, heads, tokens, tokens), cached in inference. The
        values are always indexed (query, key); `key_major` lays them out in memory with the query varying fastest (a
        transposed view of a contiguous tensor), as the fused kernel reads them, instead of contiguous for SDPA."""
        table = self.relative_position_bias_table
        cacheable = not (torch.is_grad_enabled() and table.requires_grad) and not torch.compiler.is_compiling()
        if not cacheable:
            return self._attention_mask(shift_mask, key_major)
        weights_key = (table.data_ptr(), table._version, table.device, table.dtype)
        if self._mask_cache is None or self._mask_cache[0] != weights_key or len(self._mask_cache[1]) > 4:
            self._mask_cache = (weights_key, {})
        masks = self._mask_cache[1]
        layout = (None if shift_mask is None else (shift_mask.data_ptr(), shift_mask._version), key_major)
        if layout not in masks:
            masks[layout] = self._attention_mask(shift_mask, key_major)
        return masks[layout]

    def _attention_mask(self, shift_mask: torch.Tensor | None, key_major: bool) -> torch.Tensor:
        mask = self.relative_position_bias().unsqueeze(0)
        if shift_mask is not None:
            mask = mask + shift_mask.to(mask.dtype).unsqueeze(1)
        if key_major:
            return mask.transpose(-1, -2).contiguous().transpose(-1, -2)
        return mask.contiguous()  # SDPA's CPU kernel would copy a strided mask on every call

    def forward(
        self, windows: torch.Tensor, shift_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """windows: (batch, num_windows, tokens, dim); shift_mask: (num_windows, tokens, tokens) or None.
        Returns the projected context and, with `output_attentions`, (batch, num_windows, heads, tokens, tokens)."""
        batch, num_windows, tokens, dim = windows.shape
        mask = self.attention_mask(shift_mask)  # (num_windows or 1, heads, tokens, tokens)
        if mask.shape[0] > 1:  # a per-window mask cannot broadcast over batch * windows (a view for batch 1)
            mask = mask.expand(batch, *mask.shape).reshape(batch * num_windows, *mask.shape[1:])
        weights_shape = (batch, num_windows, self.num_heads, tokens, tokens)
        attended, weights = self.attend(
            windows.reshape(batch * num_windows, tokens, dim), mask, output_attentions, weights_shape
        )
        return attended.view(batch, num_windows, tokens, dim), weights

    def fuses(self, windows: torch.Tensor) -> bool:
        """Whether inference on these (windows, tokens, dim) takes the fused CPU kernel (`native_kernels`) in place of
        SDPA: under the default "sdpa" implementation, in fp32 CPU inference, for the window and head sizes it takes."""
        return (
            not self.training
            and self.config._attn_implementation == "sdpa"
            and fused_attention_applies(windows, self.num_heads, self.head_dim, *self.qkv.parameters())
        )

    def attend_fused(
        self,
        windows: torch.Tensor,
        mask: torch.Tensor,
        first_window: int,
        output_bias: bool = True,
        window_masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`attend` through the fused CPU kernel, for windows (windows, tokens, dim) that start at window `first_window`
        of the batch; mask (windows per image or 1, heads, tokens, tokens) is indexed per window by the kernel, and
        `window_masks` (kinds, kind of each window of an image) are added per window (`HTSATSwinBlock.shift_kinds`).
        The qkv bias of a plain linear layer is applied by the kernel rather than written into the GEMM's output; with
        `output_bias=False` the output projection's bias is left to the caller, which adds it with the residual."""
        split = bias_separable(self.qkv)
        qkv = linear(windows, self.qkv, with_bias=not split)
        qkv_bias = self.qkv.bias if split else None
        kinds, kind_of_window = window_masks if window_masks is not None else (None, None)
        context = window_attention(
            qkv, mask, self.num_heads, self.scale, first_window,
            qkv_bias=qkv_bias, window_masks=kinds, window_kinds=kind_of_window,
        )
        return linear(context, self.proj, with_bias=output_bias)

    def attend(
        self,
        windows: torch.Tensor,
        mask: torch.Tensor,
        output_attentions: bool = False,
        weights_shape: tuple[int, ...] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention over (windows, tokens, dim) with an additive mask (windows or 1, heads, tokens, tokens), then the
        output projection, through Transformers' attention interface: `config._attn_implementation` ("sdpa" by
        default, "eager", or a registered function) decides, so `set_attn_implementation` takes effect. SDPA's 4-D
        (windows, heads, tokens, head_dim) views of the qkv projection reach PyTorch's fused CPU kernel. With
        `output_attentions` the eager path runs and returns the weights it used, laid out as `weights_shape`."""
        count, tokens, dim = windows.shape
        dropout = self.config.attention_probs_dropout_prob if self.training else 0.0
        qkv = linear(windows, self.qkv).view(count, tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # views (windows, heads, tokens, head_dim)
        if output_attentions:
            attention = eager_attention_forward
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        context, weights = attention(
            self, query, key, value, mask, dropout=dropout, scaling=self.scale, weights_shape=weights_shape
        )
        context = context.reshape(count, tokens, dim)  # (windows, tokens, heads, head_dim) from every implementation
        return self.proj_drop(linear(context, self.proj)), (weights if output_attentions else None)


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
    """fc1 -> exact (erf) GELU -> fc2, with dropout; in CPU inference fc1 and GELU run as one fused oneDNN op."""

    def __init__(self, config: HTSATConfig, dim: int):
        super().__init__()
        hidden = int(dim * config.mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.drop(linear(self.drop(linear(hidden, self.fc1, "gelu")), self.fc2))

    def add_to(self, residual: torch.Tensor, hidden: torch.Tensor, with_output_bias: bool = True) -> None:
        """Inference: `residual += mlp(hidden)`, accumulated by fc2's GEMM; fc2's bias is left out where the caller
        has added it already (`with_output_bias=False`)."""
        linear_add_(residual, linear(hidden, self.fc1, "gelu"), self.fc2, with_bias=with_output_bias)


class HTSATSwinBlock(GradientCheckpointingLayer):
    """
    Pre-norm Swin block: (shifted) window attention and MLP, each with a residual and stochastic depth.

    It takes and returns its tokens in its own window order, `tokens[:, window_order]` of the (batch, grid * grid)
    row-major grid (the cyclic shift, if any, included), so a window is a run of consecutive tokens and no partition
    or reverse copies are needed; `HTSATStage` moves the tokens between the blocks' orders. In CPU inference the block
    runs on chunks of whole windows and updates `hidden` in place (the stage hands it a tensor of its own).
    """

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
        self.windows_per_chunk = self.chunk_size(int(dim * config.mlp_ratio))
        self._kinds_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None  # never saved

    def create_shift_mask(self) -> torch.Tensor | None:
        return shifted_window_mask(self.grid, self.window, self.shift) if self.shift else None

    def shift_kinds(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The distinct windows of the shift mask (kinds, tokens, tokens), laid out key-major for the fused kernel,
        and each window's kind (windows per image,): four kinds (interior, two edges, corner) in place of a mask per
        window. None for a block without shift. Cached while the mask buffer is unchanged."""
        if self.shift_mask is None:
            return None
        key = (self.shift_mask.data_ptr(), self.shift_mask._version, self.shift_mask.device)
        if self._kinds_cache is None or self._kinds_cache[0] != key:
            kinds, kind_of_window = torch.unique(self.shift_mask.float(), dim=0, return_inverse=True)  # 0 / -100
            self._kinds_cache = (key, (kinds.transpose(-1, -2).contiguous().transpose(-1, -2), kind_of_window))
        return self._kinds_cache[1]

    def window_order(self) -> torch.Tensor:
        """(grid * grid,) grid positions of this block's tokens, window after window."""
        return shifted_window_order(self.grid, self.window, self.shift)

    def chunk_size(self, mlp_hidden: int) -> int:
        """Windows per chunk in CPU inference: about CHUNK_HIDDEN_ELEMENTS hidden-layer floats, and either a divisor
        or a multiple of the windows per image, so that a chunk's shift mask is a slice or a repeat."""
        tokens = self.window * self.window
        windows_per_image = (self.grid // self.window) ** 2
        wanted = max(1, CHUNK_HIDDEN_ELEMENTS // (mlp_hidden * tokens))
        if wanted >= windows_per_image:
            return windows_per_image * (wanted // windows_per_image)
        return max(d for d in range(1, wanted + 1) if windows_per_image % d == 0)

    def forward(
        self, hidden: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden: (batch, grid * grid, dim) in this block's window order."""
        if cpu_inference_applies(self, hidden, output_attentions):
            return self.forward_in_chunks(hidden), None
        batch, tokens, dim = hidden.shape
        windows = self.norm1(hidden).view(batch, -1, self.window * self.window, dim)
        attended, weights = self.attn(windows, self.shift_mask, output_attentions)
        hidden = hidden + self.drop_path(attended.view(batch, tokens, dim))
        return hidden + self.drop_path(self.mlp(self.norm2(hidden))), weights

    def forward_in_chunks(self, hidden: torch.Tensor) -> torch.Tensor:
        """CPU inference on (batch, grid * grid, dim) tokens in this block's window order, in place."""
        rows = hidden.view(-1, hidden.shape[-1])
        self.update_in_chunks(rows, rows)
        return hidden

    def update_in_chunks(self, source: torch.Tensor, target: torch.Tensor, order: torch.Tensor | None = None) -> None:
        """
        CPU inference: `target[order] = block(source[order])` on (tokens, dim) rows, where `order` lists the rows in
        this block's window order (None: they are in it already); `source` may be `target`. Attention and MLP run on
        chunks of whole windows so that each chunk's qkv, attention and 4x-wide MLP tensors stay in cache (unchunked,
        these passes are bound by memory bandwidth), and a chunk is gathered from `source` and written back to
        `target` as it is processed, so tokens change order without a pass or a tensor of their own. With the fused
        kernels the attention's residual add, the output projection's bias, norm2 and fc2's bias are one pass
        (`native_kernels.layer_norm`), and fc2's GEMM accumulates into the tokens.
        """
        dim = source.shape[-1]
        tokens = self.window * self.window
        total = source.shape[0] // tokens
        fused = self.attn.fuses(source.view(total, tokens, dim))
        if fused:  # the position bias (1, heads, q, k) and the shift mask's few kinds, added apart by the kernel
            mask, window_masks = self.attn.attention_mask(None, key_major=True), self.shift_kinds()
        else:
            mask = self.attn.attention_mask(self.shift_mask)  # (windows per image or 1, heads, q, k)
        # the projection's and fc2's biases go into norm2's pass (quantised or replaced layers apply their own)
        split_biases = fused and bias_separable(self.attn.proj) and bias_separable(self.mlp.fc2)
        later_biases = (self.attn.proj.bias, self.mlp.fc2.bias) if split_biases else (None, None)
        in_place = source.data_ptr() == target.data_ptr()
        gathered = None if order is None else source.new_empty(min(self.windows_per_chunk, total) * tokens, dim)
        repeated: dict[int, torch.Tensor] = {}
        for first in range(0, total, self.windows_per_chunk):
            start, stop = first * tokens, min(first + self.windows_per_chunk, total) * tokens
            if order is None:
                part = target[start:stop] if in_place else target[start:stop].copy_(source[start:stop])
            else:
                part = copy_rows(source, gathered[: stop - start], order[start:stop])
            windows = layer_norm(part, self.norm1).view(-1, tokens, dim)
            if fused:
                attended = self.attn.attend_fused(windows, mask, first, not split_biases, window_masks)
            else:
                attended, _ = self.attn.attend(windows, chunk_mask(mask, first, windows.shape[0], repeated))
            normed = layer_norm(part, self.norm2, attended.view(-1, dim), *later_biases)
            self.mlp.add_to(part, normed, with_output_bias=not split_biases)
            if order is not None:
                copy_rows(part, target, None, order[start:stop])


class HTSATPatchMerging(nn.Module):
    """Concatenates each 2 x 2 neighbourhood of tokens (4C), LayerNorm, linear to 2C: halves the grid."""

    def __init__(self, config: HTSATConfig, dim: int, grid: int):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * dim, eps=config.layer_norm_eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if cpu_inference_applies(self, hidden) and merge_norm_applies(hidden, self.norm):
            return self.forward_in_chunks(hidden)
        batch, _, dim = hidden.shape
        grid = hidden.view(batch, self.grid, self.grid, dim)
        merged = torch.cat(
            [grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], dim=-1
        ).view(batch, -1, 4 * dim)
        return linear(layer_norm(merged, self.norm), self.reduction)

    def forward_in_chunks(self, hidden: torch.Tensor) -> torch.Tensor:
        """CPU inference: concatenation and LayerNorm in one pass into a cache-sized chunk (`native_kernels.merge_norm`),
        then the linear layer on it, chunk after chunk, so neither the concatenation nor its norm is written out whole
        (at the first stage each was a 25 MB tensor per batch of 16, which the system mapped anew on every call)."""
        batch, tokens, dim = hidden.shape
        total = batch * tokens // 4
        output = hidden.new_empty(batch, tokens // 4, self.reduction.out_features)
        rows = output.view(total, -1)
        per_chunk = max(1, CHUNK_HIDDEN_ELEMENTS // (4 * dim))
        normed = hidden.new_empty(min(per_chunk, total), 4 * dim)
        for first in range(0, total, per_chunk):
            count = min(per_chunk, total - first)
            merged = merge_norm(hidden, self.grid, self.norm, first, count, out=normed[:count])
            rows[first : first + count] = linear(merged, self.reduction)
        return output


class HTSATStage(nn.Module):
    """Swin blocks at one resolution, then patch merging (all but the last stage). Takes and returns tokens in
    row-major grid order; inside, each block gets them in its window order through one gather per block, or, in CPU
    inference, reads its chunks of windows from the grid-ordered tokens and writes them back (`forward_in_chunks`)."""

    def __init__(self, config: HTSATConfig, stage: int, drop_paths: list[float]):
        super().__init__()
        self.blocks = nn.ModuleList(
            [HTSATSwinBlock(config, stage, block, drop_paths[block]) for block in range(config.depths[stage])]
        )
        last = stage == config.num_stages - 1
        self.downsample = (
            None
            if last
            else HTSATPatchMerging(config, config.hidden_sizes[stage], config.stage_grid_size(stage))
        )
        self.register_buffer("layout_orders", self.create_layout_orders(), persistent=False)
        self.register_buffer("window_orders", self.create_window_orders(), persistent=False)
        with torch.device("cpu"):  # models may be built on the meta device; these flags need real values
            orders = self.create_layout_orders()
            grid_positions = torch.arange(orders.shape[1])
            self.in_grid_order = [torch.equal(order, grid_positions) for order in self.create_window_orders()]
        # Moves that change nothing are skipped, except the first: a block updates its input in place in CPU
        # inference, so it must not get the caller's tensor.
        self.layout_moves = [j == 0 or not torch.equal(order, grid_positions) for j, order in enumerate(orders)]

    def create_window_orders(self) -> torch.Tensor:
        """(blocks, grid * grid): the grid position of each token of block j's window order."""
        return torch.stack([block.window_order() for block in self.blocks])

    def create_layout_orders(self) -> torch.Tensor:
        """(blocks + 1, grid * grid): row j gathers block j's window order from block j - 1's (from the grid for
        j = 0); the last row gathers the grid order back from the last block's."""
        orders = [block.window_order() for block in self.blocks]
        moves, previous = [], torch.arange(orders[0].numel())
        for order in orders:
            moves.append(previous.argsort()[order])
            previous = order
        moves.append(previous.argsort())
        return torch.stack(moves)

    def forward(
        self, hidden: torch.Tensor, output_attentions: bool = False, in_place: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """in_place: the caller hands `hidden` over (nothing reads it afterwards), so CPU inference may update it in
        place instead of writing a new tensor."""
        weights = None
        if all(cpu_inference_applies(module, hidden, output_attentions) for module in (self, *self.blocks)) and not any(
            map(has_forward_hooks, self.blocks)
        ):
            hidden = self.forward_in_chunks(hidden, in_place)
        else:
            for block, order, move in zip(self.blocks, self.layout_orders, self.layout_moves):
                if move:
                    hidden = gather_tokens(hidden, order)
                hidden, weights = block(hidden, output_attentions)
            if self.layout_moves[-1]:
                hidden = gather_tokens(hidden, self.layout_orders[-1])
        if self.downsample is not None:
            hidden = self.downsample(hidden)
        return hidden, weights

    def forward_in_chunks(self, hidden: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """CPU inference on (batch, grid * grid, dim) tokens in grid order: each block reads its chunks of windows
        from the grid-ordered tokens and writes them back (`HTSATSwinBlock.update_in_chunks`), so the stage writes at
        most one new tensor (none `in_place`) where moving the tokens between the blocks' orders would write one per
        move (each a large tensor that the system may map anew, at about 5 us per 4 KiB page on some VMs)."""
        batch, tokens, dim = hidden.shape
        source = hidden.reshape(-1, dim)
        target = source if in_place else torch.empty_like(source)
        offsets = tokens * torch.arange(batch, device=hidden.device).unsqueeze(1)
        for block, order, in_grid_order in zip(self.blocks, self.window_orders, self.in_grid_order):
            block.update_in_chunks(source, target, None if in_grid_order else (order + offsets).flatten())
            source = target
        return target.view(batch, tokens, dim)


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
        elif isinstance(module, HTSATStage):
            init.copy_(module.layout_orders, module.create_layout_orders())
            init.copy_(module.window_orders, module.create_window_orders())

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
        self,
        input_features: torch.Tensor,
        mixup_lambda: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, list[int], int, tuple | None, tuple | None]:
        """
        Returns tokens (batch, windows, tokens, hidden) after the final LayerNorm, the windows' start frames, the
        frames per window, and the hidden states / attentions (batch * windows first) when requested.
        In training, inputs longer than one image are randomly cropped to one image, as the original does.
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
        hidden, all_hidden, all_attentions = self.encode_images(
            fold_spectrogram(features, self.config), output_hidden_states, output_attentions
        )
        tokens = hidden.view(batch, -1, hidden.shape[1], hidden.shape[2])
        return tokens, starts, window_frames, all_hidden, all_attentions

    def window_images(self, window_features: torch.Tensor) -> torch.Tensor:
        """(n, frames, mel) features of n windows (at most one image of frames each) -> (n, 1, spec, spec) images,
        mel-normalised and folded exactly as `encode_windows` does (for callers that pack windows themselves)."""
        return fold_spectrogram(self.normalize_features(window_features), self.config)

    def encode_images(
        self, images: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> tuple[torch.Tensor, tuple | None, tuple | None]:
        """(n, 1, spec, spec) folded spectrogram images -> final LayerNorm'ed tokens (n, tokens, hidden), and the
        hidden states / attentions when requested."""
        hidden = self.patch_embed(images)
        all_hidden = (hidden,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        producer: nn.Module = self.patch_embed
        for stage in self.stages:
            # a stage may update the tokens in place where no one else can see them: not returned, and no hook got them
            handed_over = not output_hidden_states and not any(map(has_forward_hooks, producer.modules()))
            hidden, weights = stage(hidden, output_attentions, in_place=handed_over)
            producer = stage
            if output_hidden_states:
                all_hidden += (hidden,)
            if output_attentions:
                all_attentions += (weights,)
        return self.norm(hidden), all_hidden, all_attentions

    def forward(
        self,
        input_features: torch.Tensor,
        mixup_lambda: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> HTSATModelOutput | tuple:
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        tokens, _, _, hidden_states, attentions = self.encode_windows(
            input_features, mixup_lambda, output_hidden_states, output_attentions
        )
        last_hidden_state = tokens.flatten(1, 2)
        output = HTSATModelOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=last_hidden_state.mean(dim=1),
            hidden_states=hidden_states,
            attentions=attentions,
        )
        return output if return_dict else output.to_tuple()


# ------------------------------------------------------------------------------------------------------ heads
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
        n, _, hidden = tokens.shape
        grid, groups, ratio = self.grid, self.freq_groups, self.config.freq_ratio
        feature_map = tokens.transpose(1, 2).reshape(n, hidden, ratio, groups, grid)
        feature_map = feature_map.permute(0, 1, 3, 2, 4).reshape(n, hidden, groups, ratio * grid)
        # The kernel spans every frequency group, so the convolution is one GEMM over (hidden, group, 3-step)
        # patches of the time axis: same result, 1.35x faster than oneDNN's convolution for this shape on CPU.
        patches = F.pad(feature_map, (1, 1)).unfold(3, 3, 1)  # (n, hidden, groups, steps, 3)
        patches = patches.permute(0, 3, 1, 2, 4).reshape(n * ratio * grid, -1)
        logits = linear_weights(patches, self.conv.weight.view(self.conv.out_channels, -1), self.conv.bias)
        return logits.view(n, ratio * grid, -1)


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
        frame_seconds = self.config.hop_length / self.config.sampling_rate
        window_frames = num_frames if num_frames <= self.config.image_frames else self.config.clip_frames
        return (window_frames - 1) * frame_seconds / self.config.token_steps

    def freeze_feature_encoder(self) -> None:
        self.htsat.freeze_feature_encoder()

    def encode_and_score(
        self,
        input_features: torch.Tensor,
        mixup_lambda: torch.Tensor | None,
        output_hidden_states: bool | None,
        output_attentions: bool | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple | None, tuple | None]:
        """Runs the backbone; returns its tokens (batch, windows, tokens, hidden), the stitched token-semantic
        `frame_logits` (None for the pooled head), and the hidden states / attentions when requested."""
        tokens, starts, window_frames, hidden_states, attentions = self.htsat.encode_windows(
            input_features,
            mixup_lambda,
            bool(output_hidden_states or self.config.output_hidden_states),
            bool(output_attentions or self.config.output_attentions),
        )
        frame_logits = None
        if self.config.use_token_semantic_head:
            windowed = not self.training and input_features.shape[1] > self.config.image_frames
            num_frames = input_features.shape[1] if windowed else window_frames
            frame_logits = self.frame_logits_from_tokens(tokens, starts, num_frames)
        return tokens, frame_logits, hidden_states, attentions

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
        if num_frames <= self.config.image_frames:  # one window
            return self.config.token_steps
        return grid_steps(self.config, num_frames)

    def stitch_window_steps(self, step_values: torch.Tensor, starts: torch.Tensor | list[int], num_frames: int
                            ) -> torch.Tensor:
        """Per-window step values ([batch,] windows, steps, labels), windows starting at frames `starts` of an input of
        `num_frames` frames -> ([batch,] total steps, labels) on one time grid of `frame_step_seconds` steps."""
        frame_seconds = self.config.hop_length / self.config.sampling_rate
        start_seconds = torch.as_tensor(starts, dtype=torch.float64) * frame_seconds
        start_steps = start_seconds / self.frame_step_seconds(num_frames)
        return stitch_on_grid(step_values, start_steps, self.total_steps(num_frames))


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

    def forward(
        self,
        input_features: torch.Tensor,
        labels: torch.Tensor | None = None,
        frame_labels: torch.Tensor | None = None,
        mixup_lambda: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> HTSATSoundEventDetectionOutput | tuple:
        """
        labels: clip labels (see `HTSATForAudioClassification`). frame_labels: (batch, steps, num_labels) strong
        labels on the `frame_logits` grid (0/1 or soft), trained with frame-level BCE added to the clip loss.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if frame_labels is not None and self.training and input_features.shape[1] > self.config.image_frames:
            raise ValueError(
                f"frame_labels need inputs of at most {self.config.image_frames} frames in training: longer inputs "
                f"({input_features.shape[1]} frames) are randomly cropped to one window, so the frame targets would "
                "not line up. Crop the audio in the data pipeline and shift the targets with it "
                "(htsat_hf.training.strong_labels.events_to_step_targets(offset_seconds=...))."
            )
        tokens, frame_logits, hidden_states, attentions = self.encode_and_score(
            input_features, mixup_lambda, output_hidden_states, output_attentions
        )
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
        output = HTSATSoundEventDetectionOutput(
            loss=loss,
            logits=logits,
            frame_logits=frame_logits,
            pooler_output=tokens.mean(dim=(1, 2)),
            hidden_states=hidden_states,
            attentions=attentions,
        )
        return output if return_dict else output.to_tuple()


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

    def forward(
        self,
        input_features: torch.Tensor,
        labels: torch.Tensor | None = None,
        mixup_lambda: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        """
        labels: multi-label (`problem_type="multi_label_classification"`): (batch, num_labels) multi-hot floats, BCE
        with logits. Single-label: (batch,) class indices or (batch, num_labels) soft targets (e.g. mixed by mixup),
        cross-entropy. Regression (num_labels == 1): MSE.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        tokens, frame_logits, hidden_states, attentions = self.encode_and_score(
            input_features, mixup_lambda, output_hidden_states, output_attentions
        )
        if frame_logits is not None:
            logits = frame_logits.mean(dim=1)
        else:
            logits = self.classifier(tokens.mean(dim=(1, 2)))
        loss = clip_loss(logits, labels, self.config) if labels is not None else None
        output = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions)
        return output if return_dict else output.to_tuple()



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
    "StepStitcher",
    "long_input_hop_frames",
    "grid_steps",
    "stitch_on_grid",
    "window_layout",
    "with_loading_info",
    "window_start_frames",
    "window_starts",
]
