"""Is a model, with its feature extractor, usable for inference? The one check the pipelines, the annotator and the
live detector run when they are built (`check_inference_ready`):

- its weights were loaded: Transformers loads a checkpoint whose keys do not fit (another architecture, keys with a
  `module.` prefix) as a randomly initialised model and only logs a report; here missing, unexpected or mismatched
  keys beyond the model's documented `_keys_to_ignore_on_load_*` patterns are refused, with the keys named;
- `preprocessor_config.json` and `config.json` agree on the front end (sampling rate, hop, FFT, mel bins, mel
  range): features computed otherwise put events at wrong times and give wrong scores.

Relative imports only: this module travels with the remote-code pipeline (`add_remote_sed_pipeline`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from transformers.utils.loading_report import update_key_name

# (feature extractor attribute, model config attribute): the front end `HTSATFeatureExtractor.for_model_config` builds
FRONT_END_SETTINGS = (
    ("sampling_rate", "sampling_rate"),
    ("hop_length", "hop_length"),
    ("n_fft", "n_fft"),
    ("feature_size", "num_mel_bins"),
    ("f_min", "f_min"),
    ("f_max", "f_max"),
)  # not max_length_seconds: the training clip length, saved with the feature extractor, may differ from clip_seconds
KEYS_SHOWN = 8


def check_inference_ready(model: Any, feature_extractor: Any = None) -> None:
    """Raises ValueError when `model`'s weights were not all loaded (`check_weights_loaded`) or when
    `feature_extractor` and `model.config` disagree on the front end (`check_front_end_agrees`)."""
    check_weights_loaded(model)
    if feature_extractor is not None:
        check_front_end_agrees(model.config, feature_extractor)


def check_weights_loaded(model: Any) -> None:
    """Raises ValueError naming the keys when `from_pretrained` left weights missing, unexpected or mismatched (the
    report `modeling_htsat.with_loading_info` keeps as `model.loading_info`; a model built in memory has none)."""
    info = getattr(model, "loading_info", None) or {}
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())
    if not (missing or unexpected or mismatched):
        return
    source = getattr(model, "name_or_path", None) or "the checkpoint"
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (left randomly initialised): {key_list(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (not used): {key_list(unexpected)}")
    if mismatched:
        shapes = [f"{key} {tuple(found)} in the checkpoint, {tuple(wanted)} in the model" for key, found, wanted in
                  mismatched]
        parts.append(f"{len(mismatched)} with another shape (left randomly initialised): "
                     f"{key_list(shapes, group=False)}")
    raise ValueError(
        f"The weights in {source} do not fit {type(model).__name__}: " + "; ".join(parts) + ". "
        + weights_advice(missing, unexpected)
    )


def key_list(keys: list[str], group: bool = True) -> str:
    """The first `KEYS_SHOWN` keys, grouped as Transformers' load report groups them (`layers.{0, 1}.x`)."""
    grouped = list(update_key_name(keys)) if group else keys
    shown = ", ".join(grouped[:KEYS_SHOWN])
    return shown + (f", ... ({len(grouped) - KEYS_SHOWN} more)" if len(grouped) > KEYS_SHOWN else "")


def weights_advice(missing: list[str], unexpected: list[str]) -> str:
    """What to do: strip a common prefix (DistributedDataParallel's `module.`, torch.compile's `_orig_mod.`) when the
    unexpected keys are the missing ones behind it; otherwise load the folder with the class it was saved from."""
    prefixes = {key[: len(key) - len(name)] for key in unexpected for name in missing if key.endswith("." + name)}
    if missing and len(prefixes) == 1:
        (prefix,) = prefixes
        return (f"The checkpoint's keys carry the prefix {prefix!r} (a training wrapper such as DistributedDataParallel "
                "or torch.compile): strip it from the state dict and save the model again (save_pretrained).")
    return ("Was the folder saved from another architecture or model size? Use a folder saved from this model class "
            "(save_pretrained), or convert the checkpoint first (htsat-hf convert for the "
            "original HTS-AT checkpoints).")


def check_front_end_agrees(config: Any, feature_extractor: Any) -> None:
    """Raises ValueError, saying which file says what, when the feature extractor (`preprocessor_config.json`) and the
    model's config (`config.json`) set a front-end setting differently, or one of them lacks it and its default
    differs. Settings a feature extractor does not have (another model's) are not compared."""
    pairs = [
        (extractor_name, getattr(feature_extractor, extractor_name), config_name, getattr(config, config_name))
        for extractor_name, config_name in FRONT_END_SETTINGS
        if hasattr(feature_extractor, extractor_name) and hasattr(config, config_name)
    ]
    pairs = [pair for pair in pairs if not _same(pair[1], pair[3])]
    if pairs:
        folder = _local_folder(getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None))
        files = {name: _read_json(folder, name) for name in ("preprocessor_config.json", "config.json")}
        differences = [
            _says("preprocessor_config.json", files, extractor_name, extractor_value) + " but "
            + _says("config.json", files, config_name, config_value)
            for extractor_name, extractor_value, config_name, config_value in pairs
        ]
        where = f" in {folder}" if folder else ""
        raise ValueError(
            f"The feature extractor and the model's config{where} disagree: " + "; ".join(differences) + ". Features "
            "computed that way are not the ones the model was trained on (events at the wrong times, wrong scores). "
            "Make the two files agree, e.g. HTSATFeatureExtractor.for_model_config(config).save_pretrained(folder) "
            "when config.json is right."
        )


def _says(file: str, files: dict[str, dict | None], name: str, value: Any) -> str:
    contents = files.get(file)
    if contents is not None and name not in contents:
        return f"{file} does not set {name} (so the default {value!r})"
    return f"{file} says {name}={value!r}"


def _same(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return a == b


def _local_folder(name: str | None) -> Path | None:
    return Path(name) if name and os.path.isdir(name) else None


def _read_json(folder: Path | None, name: str) -> dict | None:
    if folder is None or not (folder / name).is_file():
        return None
    try:
        return json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


__all__ = ["FRONT_END_SETTINGS", "check_front_end_agrees", "check_inference_ready", "check_weights_loaded"]
