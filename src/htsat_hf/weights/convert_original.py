"""Conversion of checkpoints written by the original HTS-AT training code (RetroCirce/HTS-Audio-Transformer).

The architecture is read from tensor shapes; the front-end settings (sample rate, hop, mel range) are not stored in
the weights except as the frozen mel filter bank, which is used to check the settings given.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.utils import logging

from ..configuration_htsat import HTSATConfig
from ..feature_extraction_htsat import HTSATFeatureExtractor
from ..modeling_htsat import HTSATForAudioClassification

logger = logging.get_logger(__name__)

ORIGINAL_PREFIXES = ("sed_model.", "module.")
FRONT_END_PREFIXES = ("spectrogram_extractor.", "logmel_extractor.")
BLOCK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
DOWNSAMPLE_KEY = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")


@dataclass
class ConversionReport:
    """What the conversion did with each tensor of the original checkpoint."""

    config: HTSATConfig
    ignored_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # settings that change what the model does: read these


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a Lightning checkpoint (`{"state_dict": ...}`, keys prefixed `sed_model.`) or a bare state dict, with
    `torch.load(weights_only=True)` (no pickled code is run)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - pickle, zip and format errors all mean the same thing here
        # PyTorch's own message suggests weights_only=False, which would run the file's pickled code: not for a file
        # that is not even a checkpoint.
        raise ValueError(
            f"{path} is not a PyTorch checkpoint (torch.load could not read it: {type(error).__name__}). Pass the "
            "authors' .ckpt file (e.g. HTSAT_AudioSet_Saved_1.ckpt)."
        ) from None
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} is neither an HTS-AT Lightning checkpoint nor a state dict of tensors.")
    stripped = {}
    for key, tensor in state_dict.items():
        for prefix in ORIGINAL_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        stripped[key] = tensor
    if "patch_embed.proj.weight" not in stripped:
        raise ValueError(f"{path} has no 'patch_embed.proj.weight': it does not look like an HTS-AT checkpoint.")
    return stripped


def _require(state_dict: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"The checkpoint is missing '{key}', which an HTS-AT model needs.")
    return state_dict[key]


def infer_architecture(state_dict: dict[str, torch.Tensor]) -> dict:
    """Reads the encoder's sizes from tensor shapes: widths, depths, heads, window, patch, classes, head type."""
    patch = _require(state_dict, "patch_embed.proj.weight")
    embed_dim, in_channels, patch_size, _ = patch.shape
    if in_channels != 1:
        raise ValueError(f"patch_embed.proj.weight has {in_channels} input channels; HTS-AT takes one (a spectrogram).")
    stages = sorted({int(m.group(1)) for k in state_dict if (m := BLOCK_KEY.match(k))})
    if stages != list(range(len(stages))) or not stages:
        raise ValueError(f"The checkpoint's stages are {stages}; expected layers.0 ... layers.N without gaps.")
    depths, heads = [], []
    for stage in stages:
        blocks = sorted({int(m.group(2)) for k in state_dict if (m := BLOCK_KEY.match(k)) and int(m.group(1)) == stage})
        depths.append(len(blocks))
        heads.append(_require(state_dict, f"layers.{stage}.blocks.0.attn.relative_position_bias_table").shape[1])
    table_rows = state_dict["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    window_size = (math.isqrt(table_rows) + 1) // 2
    fc1 = _require(state_dict, "layers.0.blocks.0.mlp.fc1.weight")
    token_semantic = "tscam_conv.weight" in state_dict
    classifier = _require(state_dict, "tscam_conv.weight" if token_semantic else "head.weight")
    mel_bins = _require(state_dict, "bn0.weight").shape[0]
    architecture = dict(
        embed_dim=embed_dim,
        patch_size=patch_size,
        patch_stride=patch_size,
        window_size=window_size,
        depths=depths,
        num_heads=heads,
        mlp_ratio=fc1.shape[0] / fc1.shape[1],
        qkv_bias="layers.0.blocks.0.attn.qkv.bias" in state_dict,
        num_mel_bins=mel_bins,
        use_token_semantic_head=token_semantic,
        num_labels=classifier.shape[0],
    )
    spec_size = _infer_spec_size(state_dict, window_size, patch_size)
    if spec_size is not None:
        architecture["spec_size"] = spec_size
    return architecture


def _infer_spec_size(state_dict: dict[str, torch.Tensor], window_size: int, patch_size: int) -> int | None:
    """The shifted-window masks (num_windows, W^2, W^2) give a stage's grid, hence the image size."""
    for key, tensor in state_dict.items():
        match = BLOCK_KEY.match(key)
        if match and match.group(3) == "attn_mask":
            windows_per_side = math.isqrt(tensor.shape[0])
            grid = windows_per_side * window_size * 2 ** int(match.group(1))
            return grid * patch_size
    return None


def _map_key(key: str, token_semantic: bool) -> str | None:
    """Original key -> this package's key, or None for tensors that are not carried over."""
    if key.startswith(FRONT_END_PREFIXES) or key.endswith(("attn_mask", "relative_position_index")):
        return None
    if key.startswith("bn0."):
        return "htsat.mel_batch_norm." + key[len("bn0.") :]
    if key.startswith("patch_embed."):
        return "htsat." + key
    if match := BLOCK_KEY.match(key):
        return f"htsat.stages.{match.group(1)}.blocks.{match.group(2)}.{match.group(3)}"
    if match := DOWNSAMPLE_KEY.match(key):
        return f"htsat.stages.{match.group(1)}.downsample.{match.group(2)}"
    if key.startswith("norm."):
        return "htsat." + key
    if key.startswith("tscam_conv."):
        return "classifier.conv." + key[len("tscam_conv.") :]
    if key.startswith("head.") and not token_semantic:
        return "classifier.dense." + key[len("head.") :]
    return None


def check_front_end(state_dict: dict[str, torch.Tensor], feature_extractor: HTSATFeatureExtractor) -> list[str]:
    """Compares the checkpoint's frozen STFT size and mel filter bank with the feature extractor's settings."""
    notes = []
    conv = state_dict.get("spectrogram_extractor.stft.conv_real.weight")
    if conv is not None and conv.shape[-1] != feature_extractor.n_fft:
        raise ValueError(
            f"The checkpoint's STFT window is {conv.shape[-1]} samples but n_fft is {feature_extractor.n_fft}."
        )
    mel = state_dict.get("logmel_extractor.melW")
    if mel is None:
        notes.append("no mel filter bank in the checkpoint: front-end settings taken from the flags unchecked")
        return notes
    expected = feature_extractor.mel_filters()
    if mel.shape != expected.shape or not torch.allclose(mel.float(), expected, atol=1e-5, rtol=1e-4):
        raise ValueError(
            "The checkpoint's mel filter bank does not match --sample-rate "
            f"{feature_extractor.sampling_rate}, --f-min {feature_extractor.f_min}, --f-max {feature_extractor.f_max} "
            f"(n_fft {feature_extractor.n_fft}, {feature_extractor.feature_size} bins): pass the settings the model "
            "was trained with (e.g. 16000 / 160 / 50 / 14000 for Speech Commands)."
        )
    notes.append("mel filter bank matches the front-end settings")
    return notes


def read_audioset_labels(path: str | Path) -> dict[int, str]:
    """Reads an AudioSet `index,mid,display_name` CSV into id2label."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"index", "display_name"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected index,mid,display_name.")
        labels = {}
        for row_number, row in enumerate(reader, start=2):
            try:
                labels[int(row["index"])] = row["display_name"]
            except (TypeError, ValueError):
                raise ValueError(f"{path}, row {row_number}: index {row['index']!r} is not an integer.") from None
    if sorted(labels) != list(range(len(labels))):
        raise ValueError(f"{path}: indices must run from 0 to {len(labels) - 1} without gaps.")
    return labels


def convert_original_checkpoint(
    checkpoint_path: str | Path,
    sampling_rate: int = 32000,
    hop_length: int = 320,
    f_min: float = 50.0,
    f_max: float = 14000.0,
    n_fft: int | None = None,
    single_label: bool = False,
    labels_csv: str | Path | None = None,
) -> tuple[HTSATForAudioClassification, HTSATFeatureExtractor, ConversionReport]:
    """Builds an `HTSATForAudioClassification` and its feature extractor from an original checkpoint."""
    state_dict = load_original_state_dict(checkpoint_path)
    architecture = infer_architecture(state_dict)
    conv = state_dict.get("spectrogram_extractor.stft.conv_real.weight")
    n_fft = n_fft or (conv.shape[-1] if conv is not None else 1024)
    front_end = dict(sampling_rate=sampling_rate, hop_length=hop_length, f_min=f_min, f_max=f_max, n_fft=n_fft)
    feature_extractor = HTSATFeatureExtractor(
        feature_size=architecture["num_mel_bins"],
        sampling_rate=sampling_rate,
        n_fft=n_fft,
        hop_length=hop_length,
        f_min=f_min,
        f_max=f_max,
    )
    notes = check_front_end(state_dict, feature_extractor)
    labels = {"num_labels": architecture.pop("num_labels")}
    if labels_csv is not None:
        id2label = read_audioset_labels(labels_csv)
        if len(id2label) != labels["num_labels"]:
            raise ValueError(f"{labels_csv} has {len(id2label)} labels but the checkpoint has {labels['num_labels']}.")
        labels = {"id2label": id2label, "label2id": {name: index for index, name in id2label.items()}}
    problem_type = "single_label_classification" if single_label else "multi_label_classification"
    image_frames = architecture.get("spec_size", 256) ** 2 // architecture["num_mel_bins"]
    fitting_seconds = math.floor((image_frames - 1) * hop_length / sampling_rate * 100) / 100
    warnings = []
    if fitting_seconds < HTSATConfig.clip_seconds:
        front_end["clip_seconds"] = fitting_seconds
        warnings.append(
            f"at hop {hop_length} and {sampling_rate} Hz a {image_frames}-frame image holds {fitting_seconds} s, not "
            f"{HTSATConfig.clip_seconds} s: clip_seconds is set to {fitting_seconds}, so the model sees "
            f"{fitting_seconds}-s windows, repeats short clips to {fitting_seconds} s and cuts long inputs into "
            f"{fitting_seconds}-s windows. If the checkpoint was trained at another rate (Speech Commands: "
            "--sample-rate 16000 --hop-length 160), give that."
        )
        for warning in warnings:
            logger.warning(warning)
    config = HTSATConfig(**architecture, **front_end, **labels, problem_type=problem_type)
    feature_extractor.max_length_seconds = config.clip_seconds

    model = HTSATForAudioClassification(config)
    expected = model.state_dict()
    converted, ignored = {}, []
    for key, tensor in state_dict.items():
        new_key = _map_key(key, config.use_token_semantic_head)
        if new_key is None:
            ignored.append(key)
            continue
        if new_key not in expected:
            raise ValueError(f"The checkpoint tensor '{key}' has no place in the model ({new_key}).")
        if tensor.shape != expected[new_key].shape:
            raise ValueError(
                f"The checkpoint tensor '{key}' has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(expected[new_key].shape)} for {new_key}."
            )
        converted[new_key] = tensor.to(expected[new_key].dtype)
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise ValueError(f"The checkpoint lacks tensors the model needs: {missing}")
    model.load_state_dict(converted, strict=True)
    model.eval()
    return model, feature_extractor, ConversionReport(config=config, ignored_keys=sorted(ignored), notes=notes, warnings=warnings)


def describe_conversion(report: ConversionReport) -> str:
    """The converted model's layout, the conversion's notes and the tensors it left out, as `htsat-hf convert` prints
    them (`report.warnings` were logged as warnings while converting)."""
    config = report.config
    lines = [
        f"HTS-AT: embed_dim {config.embed_dim}, depths {config.depths}, heads {config.num_heads}, window "
        f"{config.window_size}, spec_size {config.spec_size}, {config.num_labels} labels ({config.problem_type}), "
        f"{'token-semantic' if config.use_token_semantic_head else 'pooled'} head",
        *(f"note: {note}" for note in report.notes),
        f"ignored {len(report.ignored_keys)} tensors: {', '.join(report.ignored_keys)}",
    ]
    return "\n".join(lines)


__all__ = [
    "ConversionReport",
    "convert_original_checkpoint",
    "describe_conversion",
    "infer_architecture",
    "load_original_state_dict",
    "read_audioset_labels",
]
