"""Weight averaging of several checkpoints (the released HTS-AT models are such averages).

Floating-point tensors are averaged element-wise (accumulated in float64, cast back to their dtype). Integer and
bool tensors are never turned into floats (the original's `weight_average` did that, which is why its
`relative_position_index` buffers come back as float32): identical ones are copied, differing ones (counters such
as BatchNorm's `num_batches_tracked`) get their mean rounded to the nearest integer.

Command line: `htsat-hf average OUTPUT_DIR CHECKPOINT_DIR [CHECKPOINT_DIR ...]`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

StateDict = Mapping[str, torch.Tensor]


def average_state_dicts(state_dicts: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """Element-wise mean of state dicts with the same keys and shapes (see the module docstring for integers)."""
    if not state_dicts:
        raise ValueError("Nothing to average: pass at least one state dict.")
    keys = list(state_dicts[0].keys())
    for index, state in enumerate(state_dicts[1:], start=1):
        if set(state.keys()) != set(keys):
            missing = sorted(set(keys) - set(state.keys()))[:5]
            extra = sorted(set(state.keys()) - set(keys))[:5]
            raise ValueError(f"State dict {index} has different keys (missing {missing}, extra {extra}).")
    averaged: dict[str, torch.Tensor] = {}
    for key in keys:
        tensors = [state[key] for state in state_dicts]
        first = tensors[0]
        if any(t.shape != first.shape for t in tensors):
            raise ValueError(f"Tensor {key!r} has different shapes: {[tuple(t.shape) for t in tensors]}.")
        if first.is_floating_point() or first.is_complex():
            total = torch.zeros_like(first, dtype=torch.complex128 if first.is_complex() else torch.float64)
            for tensor in tensors:
                total += tensor.to(total.dtype)
            averaged[key] = (total / len(tensors)).to(first.dtype)
        elif all(torch.equal(first, t) for t in tensors[1:]):
            averaged[key] = first.clone()
        else:
            mean = torch.stack([t.to(torch.float64) for t in tensors]).mean(0)
            averaged[key] = mean.round().to(first.dtype)
    return averaged


def load_state_dict_from(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights of a model folder or `Trainer` checkpoint (`model.safetensors`, possibly sharded) or a `.safetensors`
    / `.bin` / `.pt` file."""
    path = Path(path)
    if path.is_dir():
        single = path / "model.safetensors"
        index = path / "model.safetensors.index.json"
        if single.exists():
            return load_file(str(single))
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_file(str(path / shard)))
            return state
        if (path / "pytorch_model.bin").exists():
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        raise FileNotFoundError(f"No model.safetensors (or sharded index / pytorch_model.bin) in {path}.")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    raise FileNotFoundError(f"Checkpoint {path} does not exist.")


def average_checkpoints(checkpoints: Sequence[str | Path], output_dir: str | Path) -> Path:
    """
    Average the weights of several model folders / `Trainer` checkpoints of the same architecture and write a model
    folder (config, safetensors weights and, when the first checkpoint has one, the feature extractor config).
    """
    from transformers import AutoConfig, AutoModelForAudioClassification

    import htsat_hf  # noqa: F401  (registers the Auto classes)

    if not checkpoints:
        raise ValueError("Pass at least one checkpoint to average.")
    first = Path(checkpoints[0])
    averaged = average_state_dicts([load_state_dict_from(path) for path in checkpoints])
    config = AutoConfig.from_pretrained(first)
    model = AutoModelForAudioClassification.from_config(config)
    missing, unexpected = model.load_state_dict(averaged, strict=False)
    if missing or unexpected:
        raise ValueError(f"Averaged weights do not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}.")
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    if (first / "preprocessor_config.json").exists():
        shutil.copy(first / "preprocessor_config.json", output_dir / "preprocessor_config.json")
    return output_dir


