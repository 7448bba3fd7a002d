"""Deployment paths give the same answers as the eager model: ONNX (dynamic batch), int8 dynamic quantisation, the
cached attention masks, and the feature extractor's cached filter bank. Correctness only; speed is benchmarked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from htsat_hf import (
    HTSATConfig,
    HTSATFeatureExtractor,
    HTSATForAudioClassification,
    HTSATForSoundEventDetection,
)
from htsat_hf.deployment import export
from htsat_hf.deployment.export import export_onnx, onnx_session, quantize_dynamic_int8, run_onnx

TINY = dict(embed_dim=16, depths=[1, 2, 2, 1], num_heads=[1, 2, 4, 8], num_labels=10)


def features(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1001, 64, generator=torch.Generator().manual_seed(seed)) * 10 - 40


def tiny(cls, seed: int = 0):
    torch.manual_seed(seed)
    return cls(HTSATConfig(**TINY)).eval()


@pytest.mark.parametrize("cls", [HTSATForAudioClassification, HTSATForSoundEventDetection])
def test_onnx_matches_pytorch_for_any_batch_and_length(cls, tmp_path):
    """One exported file: stretched short inputs, exactly one image, and windowed long inputs (any hop alignment)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = tiny(cls)
    session = onnx_session(export_onnx(model, tmp_path / "model.onnx", example_batch=2))
    for batch, seconds in ((1, 4.0), (3, 10.0), (2, 10.23), (1, 25.0), (2, 60.0), (1, 37.77)):
        frames = int(round(seconds * 100)) + 1
        x = torch.randn(batch, frames, 64, generator=torch.Generator().manual_seed(frames)) * 10 - 40
        with torch.no_grad():
            expected = model(x)
        outputs = run_onnx(session, x)
        torch.testing.assert_close(outputs[0], expected.logits, atol=1e-4, rtol=0)
        if cls is HTSATForSoundEventDetection:
            assert outputs[1].shape == expected.frame_logits.shape
            torch.testing.assert_close(outputs[1], expected.frame_logits, atol=1e-4, rtol=0)


def test_torch_export_programs_take_any_length():
    from htsat_hf.deployment.export import export_programs

    model = tiny(HTSATForSoundEventDetection)
    programs = export_programs(model)
    for name, frames in (("short", 401), ("short", 1024), ("windowed", 2501), ("windowed", 4444)):
        x = torch.randn(2, frames, 64) * 10 - 40
        with torch.no_grad():
            expected = model(x)
            logits, frame_logits = programs[name].module()(x)
        torch.testing.assert_close(frame_logits, expected.frame_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(logits, expected.logits, atol=1e-5, rtol=0)


def test_int8_dynamic_quantisation_stays_close():
    model = tiny(HTSATForAudioClassification)
    quantized = quantize_dynamic_int8(model)
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())
    assert any(type(m) is torch.nn.Linear for m in model.modules())  # the original is left untouched
    x = features(2)
    with torch.no_grad():
        reference, approx = model(x).logits, quantized(x).logits
    scale = reference.abs().max()
    assert (approx - reference).abs().max() < 0.05 * scale
    assert torch.corrcoef(torch.stack([reference.flatten(), approx.flatten()]))[0, 1] > 0.999


@pytest.mark.parametrize("engine", ["x86", "onednn"])
def test_int8_on_either_engine_stays_close_and_leaves_the_global_engine(engine):
    if engine not in export.int8_engines():
        pytest.skip(f"this PyTorch has no {engine} quantised engine")
    model, x = tiny(HTSATForAudioClassification), features(2)
    before = torch.backends.quantized.engine
    quantized = quantize_dynamic_int8(model, engine=engine)
    assert torch.backends.quantized.engine == before
    with torch.no_grad():
        reference, approx = model(x).logits, quantized(x).logits
    assert (approx - reference).abs().max() < 0.05 * reference.abs().max()
    with pytest.raises(ValueError, match="engine must be one of"):
        quantize_dynamic_int8(model, engine="tpu")


def test_cached_attention_mask_follows_new_weights():
    model = tiny(HTSATForSoundEventDetection)
    x = features(2)
    with torch.no_grad():
        model(x)  # fills the masks cache
        other = tiny(HTSATForSoundEventDetection, seed=1)
        model.load_state_dict(other.state_dict())  # in-place copies: the cache must notice
        torch.testing.assert_close(model(x).frame_logits, other(x).frame_logits, atol=1e-6, rtol=0)
    assert not any("cache" in key for key in model.state_dict())


def test_training_recomputes_the_bias_so_it_gets_gradients():
    model = tiny(HTSATForAudioClassification)
    with torch.no_grad():
        model(features(1))  # an inference pass caches masks; training must not reuse them
    model.train()
    model(features(2), labels=torch.ones(2, 10)).loss.backward()
    for name, parameter in model.named_parameters():
        if name.endswith("relative_position_bias_table"):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_shifted_window_gather_equals_roll_and_partition():
    from htsat_hf.engine.layers import window_order as shifted_window_order
    from htsat_hf.modeling_htsat import window_partition

    grid, window, shift = 16, 8, 4
    tokens = torch.randn(2, grid, grid, 3)
    rolled = window_partition(torch.roll(tokens, (-shift, -shift), (1, 2)), window).flatten(1, 2)
    gathered = tokens.flatten(1, 2)[:, shifted_window_order(grid, window, shift)]
    torch.testing.assert_close(gathered, rolled, atol=0, rtol=0)


def test_feature_extractor_caches_buffers_outside_its_json():
    extractor = HTSATFeatureExtractor()
    audio = np.random.default_rng(0).standard_normal(32000).astype(np.float32)
    first = extractor(audio, sampling_rate=32000, return_tensors="pt")["input_features"]
    assert extractor.mel_filters() is extractor.mel_filters()
    second = extractor(audio, sampling_rate=32000, return_tensors="pt")["input_features"]
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    saved = json.loads(extractor.to_json_string())
    assert not any("cache" in key for key in saved) and "n_fft" in saved
    assert extractor.mel_filters(dtype=torch.float64).dtype == torch.float64


def test_the_int8_engine_is_measured_kept_or_set(monkeypatch, tmp_path):
    engines = export.int8_engines()
    if len(engines) < 2:
        pytest.skip("one quantised engine only: nothing to choose")
    measured = export.calibrate_int8_engine(rounds=2)
    assert measured["engine"] in engines and [name for name, _ in measured["timings_ms"]] == engines
    monkeypatch.setenv("HTSAT_HF_CACHE", str(tmp_path))
    monkeypatch.delenv(export.INT8_ENGINE_VARIABLE, raising=False)
    calls = []
    choices = iter([{"engine": "onednn", "timings_ms": [["x86", 2.0], ["onednn", 1.0]]}, {"engine": "x86"}])
    monkeypatch.setattr(export, "calibrate_int8_engine", lambda: calls.append(1) or next(choices))
    try:
        export.int8_engine.cache_clear()
        assert export.int8_engine() == "onednn"
        export.int8_engine.cache_clear()  # as a new process would start: it reads the kept choice
        assert export.int8_engine() == "onednn" and len(calls) == 1
        assert len(list(tmp_path.glob("int8-engine-*.json"))) == 1
        monkeypatch.setenv(export.INT8_ENGINE_VARIABLE, "X86")
        export.int8_engine.cache_clear()
        assert export.int8_engine() == "x86" and len(calls) == 1  # set: nothing measured
        monkeypatch.setenv(export.INT8_ENGINE_VARIABLE, "fbgemm2")
        export.int8_engine.cache_clear()
        with pytest.raises(ValueError, match="HTSAT_HF_INT8_ENGINE='fbgemm2' is not one of auto, x86, onednn"):
            export.int8_engine()
    finally:
        export.int8_engine.cache_clear()
