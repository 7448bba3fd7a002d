"""The benchmark's bookkeeping: targets, report and memory probe (the timings themselves are not tested)."""

from __future__ import annotations

import torch
from conftest import needs_torchcodec

from htsat_hf.benchmarks.model import (
    PeakMemory,
    evaluate_targets,
    format_report,
    matmul_rates,
    reference_matmuls,
    synthetic_audio,
)


def fake_results() -> dict:
    def row(model, batch, clips):
        return dict(model=model, batch=batch, clips_per_s=clips, gflop_per_clip=12.0, achieved_gflops=12.0 * clips,
                    matmul_gflops=400.0, matmul_fraction=12.0 * clips / 400.0, peak_memory_mib=100.0, seconds_per_batch=batch / clips)

    return dict(
        settings=dict(train_batch_size=8),
        environment=dict(matmul_dtype="float32", matmul_size=4096, cpu="Test CPU (avx2)", torch_threads=2),
        matmul_gflops=390.0,  # timed alone; the rows' own interleaved rate (400) is what the ceiling uses
        inference=[row("htsat_hf", 4, 20.0), row("ClapAudioModel", 4, 8.0), row("AST", 4, 1.0), row("htsat_hf", 16, 20.0)],
        training=[dict(model="htsat_hf", batch=8, samples_per_s=6.0, peak_memory_mib=900.0),
                  dict(model="AST", batch=8, samples_per_s=1.0, peak_memory_mib=3000.0)],
        feature_extraction=[dict(extractor="htsat_hf", batch=1, audio_seconds_per_s=900.0),
                            dict(extractor="ClapFeatureExtractor", batch=1, audio_seconds_per_s=250.0)],
        sed=dict(audio_seconds=3600.0, seconds=100.0, realtime_factor=36.0, windows=719, process_peak_rss_mib=1500.0),
    )


def test_targets_are_evaluated_against_the_issue():
    results = fake_results()
    targets = {t["target"]: t for t in evaluate_targets(results)}
    assert targets["inference vs ClapAudioModel, batch 4"]["value"] == 2.5
    assert targets["inference vs ClapAudioModel, batch 4"]["met"]
    # 400 GFLOP/s over 12 GFLOP per clip is 33.3 clips/s at most: 4.17x ClapAudioModel's 8 clips/s
    assert abs(targets["inference vs ClapAudioModel, batch 4"]["ceiling"] - 400.0 / 12.0 / 8.0) < 1e-12
    assert targets["inference vs AST, batch 4"]["value"] == 20.0
    assert targets["fraction of fp32 matmul rate, batch 16"]["value"] == 12.0 * 20.0 / 400.0
    assert not targets["fraction of fp32 matmul rate, batch 16"]["met"]
    assert targets["feature extraction vs ClapFeatureExtractor, batch 1"]["value"] == 3.6
    assert targets["training peak memory / AST's, batch 8"]["met"]  # 0.30 <= 1/3
    results["targets"] = list(targets.values())
    report = format_report(results)
    assert "MISSED" in report and "htsat_hf" in report
    assert "2.50x (target >= 2x; at 100% of the matmul rate: 4.17x)" in report
    assert report.startswith("CPU: Test CPU (avx2), 2 threads")


def test_target_names_follow_the_run():
    """A GPU run's training step at batch 32 in bf16: the names say so (they said batch 8 and fp32 whatever ran)."""
    results = fake_results()
    for row in results["training"]:
        row["batch"] = 32
    results["environment"]["matmul_dtype"] = "bfloat16"
    names = {t["target"] for t in evaluate_targets(results)}
    assert {"training samples/s vs AST, batch 32", "fraction of bfloat16 matmul rate, batch 16"} <= names
    assert not any("batch 8" in name or "fp32" in name for name in names)


def test_report_lists_each_matmul_library_rate():
    results = fake_results()
    results["inference"][0]["matmul_gflops_by_library"] = {"torch.mm": 350.0, "oneDNN": 400.0}
    results["targets"] = evaluate_targets(results)
    assert "batch-4 rounds: torch.mm 350, oneDNN 400 (the fastest is 'matmul')" in format_report(results)


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory("cpu") as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    if memory.mib is not None:  # None where /proc/self/clear_refs is not writable
        assert memory.mib > 48


def test_synthetic_audio_is_consistent_across_overlapping_windows():
    rate = 32000
    whole = synthetic_audio(0, 3 * rate, rate)
    part = synthetic_audio(rate + 123, rate, rate)
    torch.testing.assert_close(part, whole[rate + 123 : 2 * rate + 123])


def test_reference_matmuls_compute_the_same_product_and_rates_come_per_library():
    matmuls = reference_matmuls(64, "cpu", torch.float32)
    products = [call() for call in matmuls.values()]
    for product in products[1:]:
        torch.testing.assert_close(product, products[0], rtol=1e-4, atol=1e-3)
    rates = matmul_rates({name: [0.5, 1.0, 2.0] for name in matmuls} | {"htsat_hf": [1.0]}, 64)
    assert set(rates) <= {"torch.mm", "oneDNN", "oneDNN packed"} and "torch.mm" in rates
    assert rates["torch.mm"] == 2 * 64**3 / 1.0 / 1e9


@needs_torchcodec
def test_fidelity_of_int8_bf16_and_onnx_on_a_saved_model(tmp_path):
    """The fidelity section runs end to end on a saved model and its audiofolder (a tiny random one here; the
    benchmark uses a trained one) and reports each variant against fp32."""
    import numpy as np
    import soundfile as sf
    from conftest import save_tiny_classifier

    from htsat_hf.benchmarks.model import trained_model_fidelity

    folder = save_tiny_classifier(tmp_path / "model")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "data" / "test" / label).mkdir(parents=True)
        for n in range(3):
            sf.write(tmp_path / "data" / "test" / label / f"{n}.wav", rng.standard_normal(16000) * 0.1, 16000)
    report = trained_model_fidelity(str(folder), str(tmp_path / "data"), batch=4)
    assert report["clips"] == 6
    variants = {v["variant"]: v for v in report["variants"]}
    assert {"int8", "bf16"} <= set(variants)
    for v in variants.values():
        assert 0.0 <= v["top1_agreement"] <= 1.0 and v["max_probability_change"] >= 0.0
    if "onnxruntime" in variants:  # the exported graph is the fp32 model
        assert variants["onnxruntime"]["max_logit_change"] < 1e-4
        assert variants["onnxruntime"]["top1_agreement"] == 1.0
    assert variants["bf16"]["max_logit_change"] > 0.0  # bf16 really ran in bf16


def test_gpu_settings_take_the_issue_batch_sizes_unless_given():
    from htsat_hf.benchmarks.model import BenchmarkSettings

    gpu = BenchmarkSettings.for_device("cuda:1", bf16=True)
    assert (gpu.device, gpu.bf16, gpu.batch_sizes, gpu.train_batch_size) == ("cuda:1", True, (1, 16, 128), 32)
    quick = BenchmarkSettings.for_device("cuda", quick=True)
    assert quick.quick and quick.batch_sizes == (1, 16) and quick.repeats == 3 and quick.train_batch_size == 32
    given = BenchmarkSettings.for_device("cuda", batch_sizes=(64,), train_batch_size=4)
    assert (given.batch_sizes, given.train_batch_size) == ((64,), 4)
    cpu = BenchmarkSettings.for_device("cpu")
    assert (cpu.batch_sizes, cpu.train_batch_size) == ((1, 4, 16), 8)
    assert BenchmarkSettings.for_device("cpu", quick=True).batch_sizes == (1, 4)


def test_tiny_model_size_builds_tiny_models_and_a_small_matmul_and_paper_stays_the_default():
    """`--model-size tiny` checks a benchmark's plumbing in seconds on any CPU; without it the run is unchanged."""
    import pytest

    from htsat_hf.benchmarks.model import BenchmarkSettings, build_candidates, htsat_config, peer_configs

    paper = BenchmarkSettings.for_device("cuda", bf16=True)
    assert (paper.model_size, paper.matmul_size) == ("paper", 4096)
    assert htsat_config().embed_dim == 96 and peer_configs()[0].patch_embeds_hidden_size == 96
    tiny = BenchmarkSettings.for_device("cpu", model_size="tiny", batch_sizes=(1,), train_batch_size=1,
                                        include_int8=False, include_onnx=False, include_cpu_bf16=False,
                                        include_torch_ops=False)
    assert tiny.matmul_size == 256
    assert BenchmarkSettings.for_device("cpu", model_size="tiny", matmul_size=64).matmul_size == 64
    candidates = {c.name: c for c in build_candidates(tiny)}
    assert set(candidates) == {"htsat_hf", "ClapAudioModel", "AST"}
    for candidate in candidates.values():
        assert sum(p.numel() for p in candidate.model.parameters()) < 1_000_000  # the paper-size ones: tens of millions
    assert candidates["htsat_hf"].model.config.num_labels == 527
    with pytest.raises(ValueError, match="model_size must be one of paper, tiny, not 'small'"):
        BenchmarkSettings(model_size="small")
