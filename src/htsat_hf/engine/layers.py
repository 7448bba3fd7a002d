"""Faster forwards for fp32 CPU inference of the layers `modeling_htsat` marks (`faster_forward`), swapped in by
`attach.py`. Each class here has a `forward` only (Transformers' `kernels` rejects replacement layers with their own
constructor or members): it runs bound to the model's own layer, makes one applicability check per call
(`engine_applies`: eval mode, no autograd, CPU, fp32, no compiler tracing or export, no attention weights asked for,
no hooks that must see the blocks) and otherwise runs the definition's forward. What the fast paths need beyond the
weights (window orders, chunk sizes, cached masks in the fused kernel's layout) is derived from the config or kept in
caches keyed by module, outside the modules.

- `SpectrogramFold`: the bicubic stretch and fold of the spectrogram in one native pass (`native.fold_image`).
- `PatchEmbeddings`: the convolution with a channels-last weight (its output is the tokens, contiguous, with no
  transpose copy; 10x faster at batch 4 on CPU), normalised in place by the native LayerNorm.
- `Stage`: each Swin block runs on chunks of whole windows sized so that a chunk's qkv, attention and 4x-wide MLP
  tensors stay in cache (unchunked these passes are bound by memory bandwidth); a block reads its chunks straight from
  the grid-ordered tokens in its own window order (its cyclic shift included) and writes them back (`native.copy_rows`),
  so no roll, partition or reverse copy is made. Attention runs in the fused native kernel (relative position bias and
  the shift mask's few kinds added per window, qkv bias applied by the kernel) under the default "sdpa"
  implementation, else through Transformers' attention interface. The attention's residual add, the output
  projection's bias, norm2 and fc2's bias are one native pass; fc2's GEMM accumulates into the tokens. A stage
  updates its input in place where the layer before it handed it over (produced here, seen by no one else).
- `PatchMerging`: the 2 x 2 concatenation and its LayerNorm in one native pass into cache-sized chunks, then the
  reduction on each chunk.
- `TokenSemanticHead`: the head's convolution as one GEMM over (hidden, group, 3-step) patches of the time axis (its
  kernel spans every frequency group): 1.35x faster than oneDNN's convolution for this shape.

Linear layers take the planned GEMMs of `linear.py`; the native kernels of `native.py` fall back to PyTorch's ops on
a machine without a compiler.
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import modeling_htsat
from ..modeling_htsat import (
    HTSATPatchEmbeddings,
    HTSATPatchMerging,
    HTSATSpectrogramFold,
    HTSATStage,
    HTSATTokenSemanticHead,
    token_map_by_time,
    window_partition,
)
from .linear import bias_separable, linear, linear_add_, linear_weights, tensor_state
from .native import (
    copy_rows,
    fold_image,
    fold_image_applies,
    fused_attention_applies,
    in_onnx_export,
    layer_norm,
    layer_norm_,
    merge_norm,
    merge_norm_applies,
    window_attention,
)

# A Swin block runs on chunks of whole windows, sized so that the MLP's hidden layer holds about this many floats
# (3 MiB: the chunk's intermediate tensors stay in cache instead of streaming through memory).
CHUNK_HIDDEN_ELEMENTS = 2048 * 384


# ----------------------------------------------------------------------------------------------- when it applies
def engine_applies(module: nn.Module, hidden: torch.Tensor) -> bool:
    """Eager fp32 CPU inference without gradients: the one check each forward here makes per call."""
    return not (
        module.training
        or torch.is_grad_enabled()
        or hidden.device.type != "cpu"
        or hidden.dtype != torch.float32
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or in_onnx_export()
    )


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling `module` would run forward (pre-)hooks: its own or global ones."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
    )


def _records_outputs(hook) -> bool:
    """Whether a forward hook is one of Transformers' output-capturing hooks (`_can_record_outputs`), which hold a
    stage's tokens only while hidden states are being collected."""
    return getattr(hook, "__qualname__", "").endswith("output_capturing_hook")


def _collecting_hidden_states() -> bool:
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # another Transformers: no tokens are handed over in place
        return True
    collected = _active_collector.get()
    return bool(collected) and "hidden_states" in collected


def _others_see_output(producer: nn.Module) -> bool:
    """Whether anyone but the next layer may hold `producer`'s output: a hook on it or inside it (other than an idle
    output-capturing hook), or hidden states being collected."""
    if _collecting_hidden_states() or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(
        module._forward_pre_hooks or any(not _records_outputs(hook) for hook in module._forward_hooks.values())
        for module in producer.modules()
    )


_handed = threading.local()  # a weak reference to the tokens the last layer here handed over, per thread


def hand_over(producer: nn.Module, tokens: torch.Tensor) -> None:
    """Marks `tokens` (a tensor `producer` just made) as the next stage's to update in place, unless others see it."""
    _handed.tokens = None if _others_see_output(producer) else weakref.ref(tokens)


def take_handed_over(tokens: torch.Tensor) -> bool:
    """Whether `tokens` were handed over by the layer before (and clears the mark)."""
    handed, _handed.tokens = getattr(_handed, "tokens", None), None
    return handed is not None and handed() is tokens


# ------------------------------------------------------------------------------------------ derived layouts
@functools.lru_cache(maxsize=None)
def window_order(grid: int, window: int, shift: int) -> torch.Tensor:
    """(grid^2,) flat grid positions of a block's tokens, window after window, after its cyclic shift by `shift`:
    `tokens[:, order]` does `torch.roll` and `window_partition` in one gather."""
    positions = torch.arange(grid * grid).view(1, grid, grid, 1)
    positions = torch.roll(positions, shifts=(-shift, -shift), dims=(1, 2))
    return window_partition(positions, window).flatten()


@functools.lru_cache(maxsize=None)
def _stage_orders(blocks: tuple[tuple[int, int, int], ...]) -> tuple[torch.Tensor, tuple[bool, ...]]:
    orders = [window_order(*block) for block in blocks]
    grid_positions = torch.arange(orders[0].numel())
    return torch.stack(orders), tuple(torch.equal(order, grid_positions) for order in orders)


def stage_orders(stage: nn.Module) -> tuple[torch.Tensor, tuple[bool, ...]]:
    """(blocks, grid^2) each block's window order, and whether it is the grid order itself (no shift, one window
    row per grid row): derived from the blocks' grid, window and shift."""
    return _stage_orders(tuple((block.grid, block.window, block.shift) for block in stage.blocks))


@functools.lru_cache(maxsize=None)
def _chunk_windows(tokens: int, windows_per_image: int, mlp_hidden: int, budget: int) -> int:
    wanted = max(1, budget // (mlp_hidden * tokens))
    if wanted >= windows_per_image:
        return windows_per_image * (wanted // windows_per_image)
    return max(d for d in range(1, wanted + 1) if windows_per_image % d == 0)


def windows_per_chunk(block: nn.Module) -> int:
    """Windows per chunk: about CHUNK_HIDDEN_ELEMENTS hidden-layer floats, and either a divisor or a multiple of the
    windows per image, so that a chunk's shift mask is a slice or a repeat."""
    return _chunk_windows(
        block.window * block.window, (block.grid // block.window) ** 2, block.mlp.fc1.out_features,
        CHUNK_HIDDEN_ELEMENTS,
    )


_MASKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention -> (weights key, {layout: mask})
_KINDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # block -> (mask key, (kinds, kind of window))


def attention_mask(attn: nn.Module, shift_mask: torch.Tensor | None, key_major: bool = False) -> torch.Tensor:
    """Relative position bias plus shift mask: (windows or 1, heads, tokens, tokens), cached while the bias table is
    unchanged. The values are indexed (query, key); `key_major` lays them out with the query varying fastest (a
    transposed view of a contiguous tensor), as the fused kernel reads them, instead of contiguous for SDPA."""
    table = attn.relative_position_bias_table
    table_state = tensor_state(table)
    mask_state = None if shift_mask is None else tensor_state(shift_mask)
    if table_state is None or (shift_mask is not None and mask_state is None):  # inference tensors: nothing kept
        return build_attention_mask(attn, shift_mask, key_major)
    weights_key = (*table_state, table.device, table.dtype)
    cached = _MASKS.get(attn)
    if cached is None or cached[0] != weights_key or len(cached[1]) > 4:
        cached = _MASKS[attn] = (weights_key, {})
    layout = (mask_state, key_major)
    masks = cached[1]
    if layout not in masks:
        masks[layout] = build_attention_mask(attn, shift_mask, key_major)
    return masks[layout]


def build_attention_mask(attn: nn.Module, shift_mask: torch.Tensor | None, key_major: bool) -> torch.Tensor:
    """`attention_mask` computed afresh."""
    mask = attn.relative_position_bias().unsqueeze(0)
    if shift_mask is not None:
        mask = mask + shift_mask.to(mask.dtype).unsqueeze(1)
    return mask.transpose(-1, -2).contiguous().transpose(-1, -2) if key_major else mask.contiguous()


def shift_kinds(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The distinct windows of a block's shift mask (kinds, tokens, tokens), laid out key-major for the fused kernel,
    and each window's kind (windows per image,): four kinds (interior, two edges, corner) in place of a mask per
    window. None for a block without shift. Cached while the mask buffer is unchanged."""
    if block.shift_mask is None:
        return None
    state = tensor_state(block.shift_mask)
    key = None if state is None else (*state, block.shift_mask.device)
    cached = _KINDS.get(block)
    if key is None or cached is None or cached[0] != key:
        kinds, kind_of_window = torch.unique(block.shift_mask.float(), dim=0, return_inverse=True)  # 0 / -100
        cached = (key, (kinds.transpose(-1, -2).contiguous().transpose(-1, -2), kind_of_window))
        if key is not None:  # an inference tensor's kinds are not kept (`tensor_state`)
            _KINDS[block] = cached
    return cached[1]


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


# ------------------------------------------------------------------------------------------------- attention
def fuses(attn: nn.Module, windows: torch.Tensor) -> bool:
    """Whether attention on these (windows, tokens, dim) takes the fused native kernel in place of SDPA: under the
    default "sdpa" implementation, for the window and head sizes the kernel takes."""
    return attn.config._attn_implementation == "sdpa" and fused_attention_applies(
        windows, attn.num_heads, attn.head_dim, *attn.qkv.parameters()
    )


def attend_fused(
    attn: nn.Module,
    windows: torch.Tensor,
    mask: torch.Tensor,
    first_window: int,
    output_bias: bool = True,
    window_masks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention and output projection through the fused kernel, for windows (windows, tokens, dim) that start at
    window `first_window` of the batch; mask (windows per image or 1, heads, tokens, tokens) is indexed per window by
    the kernel, and `window_masks` (kinds, kind of each window of an image) are added per window (`shift_kinds`).
    The qkv bias of a plain linear layer is applied by the kernel rather than written into the GEMM's output; with
    `output_bias=False` the output projection's bias is left to the caller, which adds it with the residual."""
    split = bias_separable(attn.qkv)
    qkv = linear(windows, attn.qkv, with_bias=not split)
    kinds, kind_of_window = window_masks if window_masks is not None else (None, None)
    context = window_attention(
        qkv, mask, attn.num_heads, attn.scale, first_window,
        qkv_bias=attn.qkv.bias if split else None, window_masks=kinds, window_kinds=kind_of_window,
    )
    return linear(context, attn.proj, with_bias=output_bias)


def attend(attn: nn.Module, windows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention over (windows, tokens, dim) with an additive mask (windows or 1, heads, tokens, tokens), then the
    output projection, through Transformers' attention interface (`config._attn_implementation`)."""
    count, tokens, dim = windows.shape
    qkv = linear(windows, attn.qkv).view(count, tokens, 3, attn.num_heads, attn.head_dim)
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # views (windows, heads, tokens, head_dim)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(
        attn.config._attn_implementation, modeling_htsat.eager_attention_forward
    )
    context, _ = attention(attn, query, key, value, mask, dropout=0.0, scaling=attn.scale, weights_shape=None)
    return attn.proj_drop(linear(context.reshape(count, tokens, dim), attn.proj))


# ------------------------------------------------------------------------------------------------------ blocks
def update_block(block: nn.Module, source: torch.Tensor, target: torch.Tensor, order: torch.Tensor | None) -> None:
    """
    `target[order] = block(source[order])` on (tokens, dim) rows, where `order` lists the rows in the block's window
    order (None: they are in it already); `source` may be `target`. Attention and MLP run on chunks of whole windows,
    each gathered from `source` and written back to `target` as it is processed, so tokens change order without a pass
    or a tensor of their own. With the fused kernels the attention's residual add, the output projection's bias, norm2
    and fc2's bias are one pass (`native.layer_norm`), and fc2's GEMM accumulates into the tokens.
    """
    attn, mlp = block.attn, block.mlp
    dim = source.shape[-1]
    tokens = block.window * block.window
    total = source.shape[0] // tokens
    per_chunk = windows_per_chunk(block)
    fused = fuses(attn, source.view(total, tokens, dim))
    if fused:  # the position bias (1, heads, q, k) and the shift mask's few kinds, added apart by the kernel
        mask, window_masks = attention_mask(attn, None, key_major=True), shift_kinds(block)
    else:
        mask = attention_mask(attn, block.shift_mask)  # (windows per image or 1, heads, q, k)
    # the projection's and fc2's biases go into norm2's pass (quantised or replaced layers apply their own)
    split_biases = fused and bias_separable(attn.proj) and bias_separable(mlp.fc2)
    later_biases = (attn.proj.bias, mlp.fc2.bias) if split_biases else (None, None)
    in_place = source.data_ptr() == target.data_ptr()
    gathered = None if order is None else source.new_empty(min(per_chunk, total) * tokens, dim)
    repeated: dict[int, torch.Tensor] = {}
    for first in range(0, total, per_chunk):
        start, stop = first * tokens, min(first + per_chunk, total) * tokens
        if order is None:
            part = target[start:stop] if in_place else target[start:stop].copy_(source[start:stop])
        else:
            part = copy_rows(source, gathered[: stop - start], order[start:stop])
        windows = layer_norm(part, block.norm1).view(-1, tokens, dim)
        if fused:
            attended = attend_fused(attn, windows, mask, first, not split_biases, window_masks)
        else:
            attended = attend(attn, windows, chunk_mask(mask, first, windows.shape[0], repeated))
        normed = layer_norm(part, block.norm2, attended.view(-1, dim), *later_biases)
        linear_add_(part, linear(normed, mlp.fc1, "gelu"), mlp.fc2, with_bias=not split_biases)
        if order is not None:
            copy_rows(part, target, None, order[start:stop])


def stage_blocks(stage: nn.Module, hidden: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """A stage's blocks on (batch, grid * grid, dim) tokens in grid order: each block reads its chunks of windows from
    the grid-ordered tokens and writes them back (`update_block`), so the stage writes at most one new tensor (none
    `in_place`) where moving the tokens between the blocks' orders would write one per move (each a large tensor that
    the system may map anew, at about 5 us per 4 KiB page on some VMs)."""
    batch, tokens, dim = hidden.shape
    source = hidden.reshape(-1, dim)
    target = source if in_place else torch.empty_like(source)
    orders, in_grid_order = stage_orders(stage)
    offsets = tokens * torch.arange(batch).unsqueeze(1)
    for block, order, in_grid in zip(stage.blocks, orders, in_grid_order):
        update_block(block, source, target, None if in_grid else (order + offsets).flatten())
        source = target
    return target.view(batch, tokens, dim)


# ------------------------------------------------------------------------------------------- replacement layers
class SpectrogramFold(nn.Module):
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        config = self.config
        if engine_applies(self, features) and fold_image_applies(features, config.image_frames, config.freq_ratio):
            return fold_image(features, config.image_frames, config.freq_ratio)
        return HTSATSpectrogramFold.forward(self, features)


class PatchEmbeddings(nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if not engine_applies(self, image):
            return HTSATPatchEmbeddings.forward(self, image)
        # with a channels-last weight the convolution writes (batch, height, width, channels): the tokens, contiguous
        weight = self.proj.weight.to(memory_format=torch.channels_last)  # not .contiguous(): a no-op for 1 channel
        patches = F.conv2d(image, weight, self.proj.bias, self.proj.stride, self.proj.padding)
        tokens = patches.flatten(2).transpose(1, 2)
        if tokens.is_contiguous() and not has_forward_hooks(self.norm):
            tokens = layer_norm_(tokens, self.norm)  # the convolution's output is ours: normalised in place
        else:
            tokens = self.norm(tokens)
        hand_over(self, tokens)
        return tokens


class Stage(nn.Module):
    def forward(
        self, hidden: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (
            output_attentions
            or not engine_applies(self, hidden)
            or any(block.training or has_forward_hooks(block) for block in self.blocks)
        ):
            return HTSATStage.forward(self, hidden, output_attentions)
        hidden = stage_blocks(self, hidden, in_place=take_handed_over(hidden))
        if self.downsample is not None:
            hidden = self.downsample(hidden)
        hand_over(self, hidden)
        return hidden, None


class PatchMerging(nn.Module):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not engine_applies(self, hidden):
            return HTSATPatchMerging.forward(self, hidden)
        batch, tokens, dim = hidden.shape
        if not merge_norm_applies(hidden, self.norm):
            grid = hidden.view(batch, self.grid, self.grid, dim)
            merged = torch.cat(
                [grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], dim=-1
            ).view(batch, -1, 4 * dim)
            return linear(layer_norm(merged, self.norm), self.reduction)
        # concatenation and LayerNorm in one pass into a cache-sized chunk, then the linear layer on it, chunk after
        # chunk: neither the concatenation nor its norm is written out whole (at the first stage each was a 25 MB
        # tensor per batch of 16, which the system mapped anew on every call)
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


class TokenSemanticHead(nn.Module):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not engine_applies(self, tokens):
            return HTSATTokenSemanticHead.forward(self, tokens)
        feature_map = token_map_by_time(tokens, self.grid, self.config.freq_ratio)
        n, steps = feature_map.shape[0], feature_map.shape[-1]
        patches = F.pad(feature_map, (1, 1)).unfold(3, 3, 1)  # (n, hidden, groups, steps, 3)
        patches = patches.permute(0, 3, 1, 2, 4).reshape(n * steps, -1)
        logits = linear_weights(patches, self.conv.weight.view(self.conv.out_channels, -1), self.conv.bias)
        return logits.view(n, steps, -1)


LAYERS: dict[str, type[nn.Module]] = {
    "HTSATSpectrogramFold": SpectrogramFold,
    "HTSATPatchEmbeddings": PatchEmbeddings,
    "HTSATStage": Stage,
    "HTSATPatchMerging": PatchMerging,
    "HTSATTokenSemanticHead": TokenSemanticHead,
}
