"""Shared test setup: offline Hub, reference fixtures from ../shared (skipped cleanly when absent)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("HTSAT_SHARED_DIR", REPO_ROOT.parent / "shared"))


def _torchcodec_decodes() -> bool:
    try:
        from torchcodec.decoders import AudioDecoder  # noqa: F401 - also loads FFmpeg's libraries
    except Exception:  # noqa: BLE001 - not installed, or FFmpeg's libraries missing
        return False
    return True


# `datasets` decodes and encodes audio with torchcodec (a declared dependency, through datasets[audio]); images that
# lack it or FFmpeg's libraries (such as the GPU machine's) skip what needs it instead of failing.
needs_torchcodec = pytest.mark.skipif(
    not _torchcodec_decodes(), reason="needs torchcodec with FFmpeg's libraries: pip install torchcodec; apt-get install ffmpeg"
)


def shared_path(*parts: str) -> Path:
    """Path under ../shared, skipping the calling test when it does not exist."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data not available: {path}")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def save_tiny_classifier(path: Path, num_labels: int = 5, seed: int = 0) -> Path:
    """A small random-weight HTS-AT classifier (4 stages, embed_dim 8) and its feature extractor, saved to `path`."""
    import torch

    from htsat_hf import HTSATConfig, HTSATFeatureExtractor, HTSATForAudioClassification

    torch.manual_seed(seed)
    config = HTSATConfig(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], num_labels=num_labels)
    HTSATForAudioClassification(config).save_pretrained(path)
    HTSATFeatureExtractor().save_pretrained(path)
    return path


def save_tiny_detector(path: Path, seed: int = 0) -> Path:
    """A small random-weight `HTSATForSoundEventDetection` with labels tone / noise / other, saved to `path`."""
    import torch

    from htsat_hf import HTSATConfig, HTSATFeatureExtractor, HTSATForSoundEventDetection

    torch.manual_seed(seed)
    config = HTSATConfig(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], num_labels=3,
                         id2label={0: "tone", 1: "noise", 2: "other"})
    HTSATForSoundEventDetection(config).save_pretrained(path)
    HTSATFeatureExtractor().save_pretrained(path)
    return path


def loudness_step_logits(features, token_steps: int):
    """A transparent detector for tests: (windows, frames, mel) log-mel -> (windows, token_steps, 3) step logits
    where label 0 ("tone") is active (+10) at steps whose loudest mel bin is above -60 dB, the others off (-10)."""
    import torch
    import torch.nn.functional as F

    energy = features.amax(dim=-1, keepdim=True).transpose(1, 2)  # (n, 1, frames): loudest mel bin
    steps = F.adaptive_avg_pool1d(energy, token_steps).transpose(1, 2)  # (n, steps, 1)
    loud = (steps > -60).float() * 20 - 10
    return torch.cat([loud, -10 * torch.ones_like(loud), -10 * torch.ones_like(loud)], dim=-1)


@contextlib.contextmanager
def definition_only(model) -> Iterator:
    """Inside, `model` runs its definition alone, as a remote-code folder loaded without htsat_hf runs it: the CPU
    engine's forwards are taken out (`reset_kernels`) and attached again afterwards. Outputs of the two paths agree
    within 1e-5 (tests/test_engine.py); a remote-code run is compared with the same path, op for op."""
    from htsat_hf.engine import attach, attached

    had_engine = any(attached(module) for module in model.modules())
    model.reset_kernels()
    try:
        yield model
    finally:
        if had_engine:
            attach(model)
