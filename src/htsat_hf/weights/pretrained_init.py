"""Pretrained starts for HTS-AT: an ImageNet Swin Transformer (the paper's "P") or the audio tower of CLAP.

Both sources are read in Transformers' layouts:

- `SwinModel` / `SwinForImageClassification` (e.g. `microsoft/swin-tiny-patch4-window7-224`), with the v5 names
  (`attention.q_proj/k_proj/v_proj/o_proj`, `attention.relative_position_bias.relative_position_bias_table`,
  `mlp.fc1/fc2`) or the v4 names (`attention.self.query/key/value`, `attention.output.dense`,
  `intermediate.dense`, `output.dense`).
- `ClapAudioModel` / `ClapAudioModelWithProjection` / `ClapModel` (e.g. `laion/clap-htsat-unfused`): its
  `audio_encoder` is an HTS-AT backbone without the token-semantic head.

What is done to the tensors:

- RGB patch filters (Swin) are summed or averaged into one input channel (`rgb_reduction`); the patch LayerNorm that
  follows removes most of the scale difference, the bias is kept as is.
- Fused `qkv` is the concatenation of query, key and value (in that order, heads kept in their order).
- Relative position bias tables are resized per head when the windows differ (Swin-T: 7 -> 8, 13 x 13 -> 15 x 15)
  by bicubic interpolation of the table seen as a 2-D grid of relative offsets, with `align_corners=True`: target
  offset d reads source offset d * (W_src - 1) / (W_dst - 1), so offset 0 and the extreme offsets (+-(W-1) in
  each direction) are copied exactly and the others interpolated.
- Everything else is copied. The image classifier, CLAP's projection, fusion layers and text tower are not used;
  the mel BatchNorm (Swin) and the classification head are left at their fresh initialisation.

Command line (writes an initialised model folder that training can start from with `--model_name_or_path`):
    htsat-hf init swin SWIN_DIR_OR_FILE OUTPUT_DIR --num_labels 50 --single_label
    htsat-hf init clap CLAP_DIR_OR_FILE OUTPUT_DIR --labels_csv class_labels_indices.csv
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration_htsat import HTSATConfig
from ..modeling_htsat import HTSATForAudioClassification, HTSATPreTrainedModel

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# Block sub-module names of Swin (v5 and v4 layouts) and CLAP -> ours. Values ending in ".q/.k/.v" are pieces of the
# fused qkv projection.
BLOCK_RENAMES: dict[str, str] = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.q_proj": "attn.q",
    "attention.k_proj": "attn.k",
    "attention.v_proj": "attn.v",
    "attention.self.query": "attn.q",
    "attention.self.key": "attn.k",
    "attention.self.value": "attn.v",
    "attention.o_proj": "attn.proj",
    "attention.output.dense": "attn.proj",
    "attention.relative_position_bias": "attn",
    "attention.self": "attn",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
SWIN_BLOCK = re.compile(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)\.([^.]+)$")
SWIN_DOWNSAMPLE = re.compile(r"^encoder\.layers\.(\d+)\.downsample\.(.+)$")
CLAP_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)\.([^.]+)$")
CLAP_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")
QKV_PIECE = re.compile(r"^(.+)\.attn\.([qkv])\.(weight|bias)$")
REBUILT_BUFFERS = ("relative_position_index", "attn_mask")


@dataclass
class InitReport:
    """What a pretrained start did: the model, where each of its tensors came from, and what was left over."""

    source: str
    model: HTSATPreTrainedModel
    loaded: dict[str, str] = field(default_factory=dict)  # our tensor -> the source tensor(s) it was built from
    new: list[str] = field(default_factory=list)  # our tensors left at their fresh initialisation
    unused: list[str] = field(default_factory=list)  # source tensors with no place in HTS-AT
    resized: list[str] = field(default_factory=list)  # our bias tables interpolated to another window
    config_overrides: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # field -> (given, used)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for logs."""
        lines = [
            f"initialised from {self.source}: {len(self.loaded)} tensors loaded, {len(self.resized)} bias tables "
            f"resized, {len(self.new)} newly initialised, {len(self.unused)} source tensors unused",
            f"newly initialised: {', '.join(self.new) or '-'}",
            f"unused: {', '.join(_compact(self.unused)) or '-'}",
        ]
        lines += [f"config {name}: {given} -> {used}" for name, (given, used) in self.config_overrides.items()]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _compact(keys: Sequence[str], limit: int = 12) -> list[str]:
    return list(keys[:limit]) + ([f"... ({len(keys) - limit} more)"] if len(keys) > limit else [])


# ------------------------------------------------------------------------------------------------ reading sources
def load_weights(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Weights of a Transformers folder (`model.safetensors`, possibly sharded) or a `.safetensors` file. Pickled
    files (`.bin`, `.pt`, `.pth`, `.ckpt`) are refused unless `allow_pickle`, and then read with
    `torch.load(weights_only=True)`: only do that for files you trust, or convert them to safetensors first."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        if (path / "model.safetensors").exists():
            return load_file(str(path / "model.safetensors"))
        index = path / "model.safetensors.index.json"
        if index.exists():
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(load_file(str(path / shard)))
            return state
        pickled = [p for p in sorted(path.iterdir()) if p.suffix in PICKLE_SUFFIXES]
        if pickled and allow_pickle:
            return load_weights(pickled[0], allow_pickle=True)
        hint = f" It holds pickled weights ({pickled[0].name}); see allow_pickle." if pickled else ""
        raise FileNotFoundError(f"No model.safetensors in {path}.{hint}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ValueError(
                f"{path} is a pickle; refusing to load it. Convert it to safetensors, or pass allow_pickle=True "
                "(--allow_pickle) for a file you trust (it is then read with torch.load(weights_only=True))."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold a state dict.")
        return state
    raise FileNotFoundError(f"{path} is neither a model folder nor a .safetensors file.")


def source_state(source: nn.Module | Mapping[str, torch.Tensor] | str | Path, allow_pickle: bool = False):
    """(state dict, source config as a dict or None) of a module, a state dict, a folder or a weights file."""
    if isinstance(source, nn.Module):
        config = getattr(source, "config", None)
        return dict(source.state_dict()), (config.to_dict() if config is not None else None)
    if isinstance(source, Mapping):
        return dict(source), None
    path = Path(source)
    config_file = path / "config.json" if path.is_dir() else None
    config = json.loads(config_file.read_text()) if config_file is not None and config_file.exists() else None
    return load_weights(path, allow_pickle), config


def _strip_prefix(
    state: dict[str, torch.Tensor], prefixes: Sequence[str]
) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """Removes the first of `prefixes` that the keys carry (`swin.`, `audio_model.audio_encoder.`, ...); keys
    without it (an image classifier, a text tower) come back separately as foreign."""
    for prefix in prefixes:
        if any(key.startswith(prefix) for key in state):
            inner = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
            return inner, sorted(key for key in state if not key.startswith(prefix)), prefix
    return state, [], ""


# --------------------------------------------------------------------------------------------- tensor transforms
def reduce_rgb_patch_filters(weight: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """(out, 3, k, k) -> (out, 1, k, k): the filters summed (`"sum"`: a grey image gives the same response) or
    averaged (`"mean"`: what the HTS-AT authors did) over the input channels."""
    if mode not in ("sum", "mean"):
        raise ValueError(f"rgb_reduction must be 'sum' or 'mean', got {mode!r}.")
    return weight.sum(dim=1, keepdim=True) if mode == "sum" else weight.mean(dim=1, keepdim=True)


def window_of_table(table: torch.Tensor) -> int:
    """Window size W of a ((2W-1)^2, heads) relative position bias table."""
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0] or side % 2 == 0:
        raise ValueError(f"A relative position bias table has (2W-1)^2 rows; got {table.shape[0]}.")
    return (side + 1) // 2


def resize_relative_position_bias_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """((2W-1)^2, heads) -> ((2w-1)^2, heads) for window w: bicubic, per head, over the (dh, dw) offset grid
    (align_corners=True: offset 0 and the extreme offsets are copied exactly)."""
    source_window = window_of_table(table)
    if source_window == window:
        return table.clone()
    heads = table.shape[1]
    side, new_side = 2 * source_window - 1, 2 * window - 1
    grid = table.detach().float().t().reshape(1, heads, side, side)
    resized = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=True)
    return resized.reshape(heads, new_side * new_side).t().contiguous().to(table.dtype)


# --------------------------------------------------------------------------------------------- key translation
def _block_target(stage: str, block: str, module: str, name: str) -> str | None:
    renamed = BLOCK_RENAMES.get(module)
    if renamed is None:
        return None
    if name == "relative_position_bias_table":
        return f"htsat.stages.{stage}.blocks.{block}.attn.relative_position_bias_table"
    if name not in ("weight", "bias"):
        return None
    return f"htsat.stages.{stage}.blocks.{block}.{renamed}.{name}"


def _translate_swin(key: str) -> str | None:
    """A Swin key (without the `swin.` prefix) -> our key (q/k/v pieces as `attn.q/k/v`), or None."""
    if key.startswith("embeddings.patch_embeddings.projection."):
        return "htsat.patch_embed.proj." + key.rsplit(".", 1)[1]
    if key.startswith("embeddings.norm."):
        return "htsat.patch_embed.norm." + key.rsplit(".", 1)[1]
    if key.startswith("layernorm."):
        return "htsat.norm." + key.rsplit(".", 1)[1]
    if match := SWIN_DOWNSAMPLE.match(key):
        return f"htsat.stages.{match.group(1)}.downsample.{match.group(2)}"
    if match := SWIN_BLOCK.match(key):
        return _block_target(*match.groups())
    return None


def _translate_clap(key: str) -> str | None:
    """A CLAP audio-encoder key (without `audio_encoder.`) -> our key (q/k/v pieces as `attn.q/k/v`), or None."""
    if key.startswith(("patch_embed.proj.", "patch_embed.norm.")):
        return "htsat." + key
    if key.startswith("batch_norm."):
        return "htsat.mel_batch_norm." + key[len("batch_norm.") :]
    if key.startswith("norm."):
        return "htsat." + key
    if match := CLAP_DOWNSAMPLE.match(key):
        return f"htsat.stages.{match.group(1)}.downsample.{match.group(2)}"
    if match := CLAP_BLOCK.match(key):
        return _block_target(*match.groups())
    return None


def _translate(state: dict[str, torch.Tensor], translate) -> tuple[dict[str, tuple[str, torch.Tensor]], list[str]]:
    """Our key -> (source key, tensor), fusing q/k/v; and the source keys that have no place."""
    mapped: dict[str, tuple[str, torch.Tensor]] = {}
    pieces: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unused = []
    for key, tensor in state.items():
        target = translate(key)
        if target is None:
            unused.append(key)
        elif match := QKV_PIECE.match(target):
            pieces.setdefault(f"{match.group(1)}.attn.qkv.{match.group(3)}", {})[match.group(2)] = (key, tensor)
        else:
            mapped[target] = (key, tensor)
    for target, parts in pieces.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{target}: the source has only the {sorted(parts)} projection(s) of query/key/value.")
        names = " + ".join(parts[p][0] for p in "qkv")
        mapped[target] = (names, torch.cat([parts[p][1] for p in "qkv"], dim=0))
    return mapped, unused


# ------------------------------------------------------------------------------------------ architecture checks
def _architecture(mapped: dict[str, tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """Encoder sizes read from the translated tensors' shapes."""
    def tensor(key: str) -> torch.Tensor:
        if key not in mapped:
            raise ValueError(f"The source has no tensor for {key}: it does not look like a Swin / HTS-AT encoder.")
        return mapped[key][1]

    patch = tensor("htsat.patch_embed.proj.weight")
    block_ids = [m.groups() for k in mapped if (m := re.match(r"htsat\.stages\.(\d+)\.blocks\.(\d+)\.", k))]
    stages = sorted({int(s) for s, _ in block_ids})
    if stages != list(range(len(stages))) or not stages:
        raise ValueError(f"The source's stages are {stages}; expected 0 ... N without gaps.")
    depths = [len({b for s, b in block_ids if int(s) == stage}) for stage in stages]
    heads = [tensor(f"htsat.stages.{s}.blocks.0.attn.relative_position_bias_table").shape[1] for s in stages]
    fc1 = tensor("htsat.stages.0.blocks.0.mlp.fc1.weight")
    return dict(
        embed_dim=patch.shape[0],
        patch_size=patch.shape[-1],
        depths=depths,
        num_heads=heads,
        mlp_ratio=fc1.shape[0] / fc1.shape[1],
        qkv_bias="htsat.stages.0.blocks.0.attn.qkv.bias" in mapped,
        window_size=window_of_table(tensor("htsat.stages.0.blocks.0.attn.relative_position_bias_table")),
    )


def _adapt_config(config: HTSATConfig, wanted: dict[str, Any]) -> tuple[HTSATConfig, dict[str, tuple[Any, Any]]]:
    """A copy of `config` with the source's encoder sizes; the changed fields as (given, used)."""
    config = copy.deepcopy(config)
    overrides = {}
    for name, value in wanted.items():
        current = getattr(config, name)
        if (list(current) if isinstance(current, (list, tuple)) else current) != value:
            overrides[name] = (current, value)
            setattr(config, name, value)
    config.validate_architecture()
    return config, overrides


def _check_model(config: HTSATConfig, wanted: dict[str, Any]) -> None:
    mismatches = {
        name: (getattr(config, name), value)
        for name, value in wanted.items()
        if (list(getattr(config, name)) if isinstance(value, list) else getattr(config, name)) != value
    }
    if mismatches:
        detail = ", ".join(f"{name}: model {ours} vs source {theirs}" for name, (ours, theirs) in mismatches.items())
        raise ValueError(
            f"The model's encoder does not match the source ({detail}). Pass an HTSATConfig instead of a model to get "
            "an HTS-AT with the source's sizes."
        )


def _materialise(model_or_config, wanted, model_class) -> tuple[HTSATPreTrainedModel, dict]:
    if isinstance(model_or_config, HTSATConfig):
        config, overrides = _adapt_config(model_or_config, wanted)
        return model_class(config), overrides
    if not isinstance(model_or_config, HTSATPreTrainedModel):
        raise TypeError(f"Expected an HTSATConfig or an HTS-AT model, got {type(model_or_config).__name__}.")
    _check_model(model_or_config.config, wanted)
    return model_or_config, {}


def _model_key(model: HTSATPreTrainedModel, key: str) -> str:
    """`htsat.`-prefixed key -> the model's own name (a bare `HTSATModel` has no `htsat.` prefix)."""
    return key if hasattr(model, "htsat") else key.removeprefix("htsat.")


def _load_into(model: HTSATPreTrainedModel, tensors: dict[str, torch.Tensor], report: InitReport) -> None:
    """Loads `tensors` (`htsat.`-prefixed keys) into `model`; names `report.loaded` as the model does; fills
    `report.new`."""
    expected = model.state_dict()
    state = {}
    for key, tensor in tensors.items():
        ours = _model_key(model, key)
        if ours not in expected:
            raise ValueError(f"{key} has no place in {type(model).__name__}.")
        if tensor.shape != expected[ours].shape:
            raise ValueError(
                f"{key}: the source gives shape {tuple(tensor.shape)}, the model expects {tuple(expected[ours].shape)}."
            )
        state[ours] = tensor.detach().to(expected[ours].dtype)
    model.load_state_dict(state, strict=False)
    report.loaded = {_model_key(model, key): source for key, source in report.loaded.items()}
    report.resized = [_model_key(model, key) for key in report.resized]
    report.new = sorted(set(expected) - set(state))


# -------------------------------------------------------------------------------------------------- public API
def init_from_swin(
    model_or_config: HTSATPreTrainedModel | HTSATConfig,
    swin: nn.Module | Mapping[str, torch.Tensor] | str | Path,
    rgb_reduction: str = "mean",
    model_class: type[HTSATPreTrainedModel] = HTSATForAudioClassification,
    allow_pickle: bool = False,
) -> InitReport:
    """
    Starts HTS-AT from a Transformers Swin Transformer (`SwinModel`, `SwinForImageClassification`, their state dict,
    or a folder / `.safetensors` file of one). Given an `HTSATConfig`, a fresh `model_class` is built with the
    source's widths, depths, heads and MLP ratio (listed in `config_overrides`; the window stays the config's);
    given a model, its encoder must already match. Returns an `InitReport` whose `.model` is the initialised model.

    Note `microsoft/swin-tiny-patch4-window7-224` has 3/6/12/24 heads, HTS-AT's default 4/8/16/32: the model built
    from it has Swin-T's heads (the authors' own start used a 4/8/16/32-head, window-8 Swin-T).
    """
    state, _ = source_state(swin, allow_pickle)
    state, foreign, prefix = _strip_prefix(state, ("swin.", "model."))
    mapped, unused = _translate(state, _translate_swin)
    wanted = _architecture(mapped)
    source_window = wanted.pop("window_size")
    model, overrides = _materialise(model_or_config, wanted, model_class)
    report = InitReport(source="swin", model=model, config_overrides=overrides)
    tensors = {}
    for target, (source_key, tensor) in mapped.items():
        if target == "htsat.patch_embed.proj.weight" and tensor.shape[1] != 1:
            tensor = reduce_rgb_patch_filters(tensor, rgb_reduction)
            source_key = f"{rgb_reduction} over the {mapped[target][1].shape[1]} input channels of {source_key}"
        if target.endswith("relative_position_bias_table"):
            tensor, source_key = _fit_table(model, target, tensor, source_key, report)
        tensors[target] = tensor
        report.loaded[target] = source_key
    _load_into(model, tensors, report)
    report.unused = sorted(prefix + key for key in unused) + foreign
    if source_window != model.config.window_size:
        report.notes.append(
            f"window {source_window} -> {model.config.window_size}: relative position bias tables interpolated"
        )
    report.notes.append("the mel BatchNorm and the classification head have no ImageNet counterpart")
    return report


def init_from_clap(
    model_or_config: HTSATPreTrainedModel | HTSATConfig,
    clap: nn.Module | Mapping[str, torch.Tensor] | str | Path,
    model_class: type[HTSATPreTrainedModel] = HTSATForAudioClassification,
    allow_pickle: bool = False,
) -> InitReport:
    """
    Starts HTS-AT from the audio tower of CLAP (`ClapAudioModel`, `ClapAudioModelWithProjection`, `ClapModel`, their
    state dict, or a folder / `.safetensors` file). Everything of CLAP's audio encoder maps one to one (query/key/value
    fused into qkv, `batch_norm` -> `mel_batch_norm`); the projection, the fusion branch (`mel_conv2d`,
    `fusion_model`), the text tower and the logit scales are reported unused, the classification head is new.
    Given an `HTSATConfig`, the model is built with CLAP's encoder sizes (and, from a model or a folder's config,
    `spec_size` and `num_mel_bins`); the front end (sampling rate, hop, mel scale) is not stored in CLAP's weights:
    see `docs/publishing.md` for the settings that match CLAP's feature extractor.
    """
    state, source_config = source_state(clap, allow_pickle)
    state, foreign, prefix = _strip_prefix(state, ("audio_model.audio_encoder.", "audio_encoder."))
    mapped, unused = _translate(state, _translate_clap)
    wanted = _architecture(mapped)
    if "htsat.mel_batch_norm.weight" in mapped:
        wanted["num_mel_bins"] = mapped["htsat.mel_batch_norm.weight"][1].shape[0]
    audio_config = (source_config or {}).get("audio_config", source_config) or {}
    if "spec_size" in audio_config:
        wanted["spec_size"] = audio_config["spec_size"]
    stride = audio_config.get("patch_stride", wanted["patch_size"])
    stride = stride[0] if isinstance(stride, (list, tuple)) else stride
    wanted["patch_stride"] = stride
    if audio_config.get("enable_patch_layer_norm") is False or audio_config.get("flatten_patch_embeds") is False:
        raise ValueError("This CLAP encoder has no patch LayerNorm / unflattened patches; HTS-AT always has both.")
    model, overrides = _materialise(model_or_config, wanted, model_class)
    report = InitReport(source="clap", model=model, config_overrides=overrides)
    tensors = {}
    for target, (source_key, tensor) in mapped.items():
        if target.endswith("relative_position_bias_table"):
            tensor, source_key = _fit_table(model, target, tensor, source_key, report)
        tensors[target] = tensor
        report.loaded[target] = source_key
    _load_into(model, tensors, report)
    report.unused = sorted(prefix + key for key in unused) + foreign
    fusion = [key for key in unused if ".fusion_model." in key or ".mel_conv2d." in key]
    if fusion:
        report.notes.append(
            f"{len(fusion)} fusion tensors unused: HTS-AT equals this CLAP encoder for inputs with is_longer=False"
        )
    report.notes.append("CLAP has no classification head: the head is newly initialised")
    return report


def _fit_table(model, target: str, table: torch.Tensor, source_key: str, report: InitReport):
    rows = model.state_dict()[_model_key(model, target)].shape[0]
    window = (math.isqrt(rows) + 1) // 2
    if window_of_table(table) == window:
        return table, source_key
    report.resized.append(target)
    return resize_relative_position_bias_table(table, window), f"{source_key} resized to window {window}"


def initialise_model(
    config: HTSATConfig,
    init_from_swin_path: str | Path | None = None,
    init_from_clap_path: str | Path | None = None,
    rgb_reduction: str = "mean",
    model_class: type[HTSATPreTrainedModel] = HTSATForAudioClassification,
    allow_pickle: bool = False,
) -> InitReport:
    """Hook for training scripts: the model for `config` started from a Swin or CLAP checkpoint (one of them)."""
    if (init_from_swin_path is None) == (init_from_clap_path is None):
        raise ValueError("Give exactly one of init_from_swin_path and init_from_clap_path.")
    if init_from_swin_path is not None:
        return init_from_swin(config, init_from_swin_path, rgb_reduction, model_class, allow_pickle)
    return init_from_clap(config, init_from_clap_path, model_class, allow_pickle)


__all__ = [
    "InitReport",
    "init_from_clap",
    "init_from_swin",
    "initialise_model",
    "load_weights",
    "reduce_rgb_patch_filters",
    "resize_relative_position_bias_table",
    "source_state",
]
