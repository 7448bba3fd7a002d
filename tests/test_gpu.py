"""On a CUDA GPU (skipped elsewhere): the paper-size model in fp32 and in bf16 autocast, the log-mel features and the
annotator's device features agree with the CPU. `scripts/gpu_check.sh` runs them before the GPU benchmarks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from htsat_hf import HTSATConfig, HTSATFeatureExtractor, HTSATForAudioClassification
from htsat_hf.time_axis import SampleSpan, span_features

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [np.random.default_rng(seed).standard_normal(320000).astype(np.float32) * 0.1 for seed in range(4)]


@pytest.fixture(scope="module")
def model_and_features(clips):
    torch.manual_seed(0)
    model = HTSATForAudioClassification(HTSATConfig()).eval()
    features = HTSATFeatureExtractor()(clips, sampling_rate=32000, return_tensors="pt")["input_features"]
    with torch.inference_mode():
        reference = model(input_features=features).logits
    return model.cuda(), features.cuda(), reference


def test_fp32_on_the_gpu_equals_the_cpu(model_and_features):
    model, features, reference = model_and_features
    with torch.inference_mode(), torch.backends.cudnn.flags(allow_tf32=False):
        matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            logits = model(input_features=features).logits.cpu()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-3)


def test_bf16_autocast_on_the_gpu_stays_close(model_and_features):
    """On the CPU, bf16 autocast moved these random-weight logits (std 0.55) by at most 0.013, correlation 0.99999."""
    model, features, reference = model_and_features
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_features=features).logits.float().cpu()
    assert (logits - reference).abs().max() < 0.1
    assert torch.corrcoef(torch.stack([logits.flatten(), reference.flatten()]))[0, 1] > 0.999


def test_log_mel_and_span_features_on_the_gpu_equal_the_cpu(clips):
    extractor = HTSATFeatureExtractor()
    waveforms = torch.from_numpy(np.stack(clips))
    cpu = extractor.log_mel(waveforms)
    torch.testing.assert_close(extractor.log_mel(waveforms.cuda()).cpu(), cpu, rtol=0, atol=1e-3)
    start, end, offset = extractor.frame_span(100, 400, recording_end=len(clips[0]))
    spans = [SampleSpan(torch.from_numpy(clip[start:end]), offset, 300) for clip in clips]
    on_gpu = span_features(spans, extractor, "cuda")
    on_cpu = span_features(spans, extractor, "cpu")
    assert all(window.device.type == "cuda" for window in on_gpu)
    for gpu_window, cpu_window in zip(on_gpu, on_cpu):
        torch.testing.assert_close(gpu_window.cpu(), cpu_window, rtol=0, atol=1e-3)
