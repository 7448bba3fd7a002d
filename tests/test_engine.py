"""The CPU engine (`htsat_hf.engine`) beside the definition: where it is attached and where it runs, that it equals the
definition, and the behaviour of its chunked, in-place stages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from htsat_hf import HTSATConfig, HTSATForAudioClassification, HTSATForSoundEventDetection
from htsat_hf import modeling_htsat
from htsat_hf.engine import attach, attached, layers, native
from htsat_hf.engine.native import merge_norm

TINY = dict(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], num_labels=6)
TOLERANCE = dict(atol=1e-5, rtol=1e-5)  # engine against definition, as fused attention against SDPA


def tiny_config(**overrides) -> HTSATConfig:
    return HTSATConfig(**{**TINY, **overrides})


def features(batch: int = 2, frames: int = 1001, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, frames, 64, generator=torch.Generator().manual_seed(seed)) * 10 - 40


def count_engine_stages(monkeypatch) -> list[int]:
    """Counts the stages run by the engine (its chunked blocks)."""
    calls = []
    real = layers.stage_blocks
    monkeypatch.setattr(layers, "stage_blocks", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    return calls


# ------------------------------------------------------------------------------------------- where it applies
def test_the_engine_runs_for_a_directly_built_eval_model(monkeypatch):
    model = HTSATForSoundEventDetection(tiny_config()).eval()
    marked = [module for module in model.modules() if hasattr(type(module), "kernel_layer_name")]
    assert len(marked) == 1 + 1 + 4 + 3 + 1 and all(map(attached, marked))  # fold, patches, stages, mergings, head
    calls = count_engine_stages(monkeypatch)
    with torch.no_grad():
        model(features())
    assert len(calls) == 4


def test_the_engine_runs_for_a_model_from_pretrained(monkeypatch, tmp_path):
    HTSATForSoundEventDetection(tiny_config()).save_pretrained(tmp_path)
    model = HTSATForSoundEventDetection.from_pretrained(tmp_path)
    assert not model.training and attached(model.htsat.stages[0]) and attached(model.classifier)
    calls = count_engine_stages(monkeypatch)
    with torch.no_grad():
        model(features())
    assert len(calls) == 4
    model.train()  # Transformers puts the definition's forwards back in training mode, and the engine back in eval
    assert not attached(model.htsat.stages[0])
    model.eval()
    assert attached(model.htsat.stages[0])


def test_the_engine_does_not_run_with_gradients_in_training_or_for_attention_weights(monkeypatch):
    model = HTSATForSoundEventDetection(tiny_config()).eval()
    calls = count_engine_stages(monkeypatch)
    model(features())  # gradients on
    with torch.no_grad():
        model(features(), output_attentions=True)
        model.train()
        model(features())
        model.eval()
        model.double()(features().double())  # not fp32
    assert calls == []


def test_training_mode_without_gradients_keeps_stochastic_depth(monkeypatch):
    """The chunked path is for inference only: a model in train() mode under no_grad (e.g. Monte-Carlo dropout)
    must still take the path that applies stochastic depth and dropout."""
    def refuse(*args, **kwargs):
        raise AssertionError("the chunked inference path ran in training mode")

    monkeypatch.setattr(layers, "update_block", refuse)
    model = HTSATForSoundEventDetection(tiny_config(drop_path_rate=0.5, spec_augment=False)).train()
    with torch.no_grad():
        first, second = model(features(1)).frame_logits, model(features(1)).frame_logits
    assert not torch.allclose(first, second)  # blocks were dropped at random


def test_reset_kernels_takes_the_engine_out_of_a_live_model(monkeypatch):
    model = HTSATForAudioClassification(tiny_config()).eval()
    with torch.no_grad():
        fast = model(features()).logits
    model.reset_kernels()
    assert not any(map(attached, model.modules()))
    calls = count_engine_stages(monkeypatch)
    with torch.no_grad():
        plain = model(features()).logits
    assert calls == []
    torch.testing.assert_close(fast, plain, **TOLERANCE)
    attach(model)
    assert attached(model.htsat.stages[0])


SWITCHED_OFF = """
import torch
from htsat_hf import HTSATConfig, HTSATForSoundEventDetection, modeling_htsat
from htsat_hf.engine import attached
model = HTSATForSoundEventDetection(HTSATConfig(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8])).eval()
model.save_pretrained("{folder}")
loaded = HTSATForSoundEventDetection.from_pretrained("{folder}")
assert not modeling_htsat.KERNELIZED_LAYERS and not modeling_htsat.POST_INIT_HOOKS
assert not any(attached(module) for m in (model, loaded) for module in m.modules())
print("definition only")
"""


def test_the_switch_leaves_the_engine_out(tmp_path):
    env = {**os.environ, "HTSAT_HF_ENGINE": "0", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", SWITCHED_OFF.format(folder=tmp_path)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "definition only" in result.stdout and "No kernel mapping found" not in result.stderr


# ------------------------------------------------------------------------------------------ equal to the definition
@pytest.mark.parametrize("frames", [1001, 2501])
def test_engine_outputs_equal_the_definitions(frames):
    torch.manual_seed(1)
    model = HTSATForSoundEventDetection(tiny_config(depths=[2, 2, 2, 1])).eval()
    inputs = features(batch=3, frames=frames)
    with torch.no_grad():
        fast = model(inputs)
    with torch.enable_grad():
        plain = model(inputs)
    torch.testing.assert_close(fast.frame_logits, plain.frame_logits.detach(), **TOLERANCE)
    torch.testing.assert_close(fast.pooler_output, plain.pooler_output.detach(), **TOLERANCE)


FIRST_CALL_IN_INFERENCE_MODE = """
import torch
from htsat_hf import HTSATConfig, HTSATForSoundEventDetection
torch.manual_seed(0)
model = HTSATForSoundEventDetection(HTSATConfig(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8])).eval()
inputs = torch.randn(2, 1001, 64) * 10 - 40
with torch.inference_mode():  # as the annotator and the pipelines run it: the machine's GEMM plan is measured here
    fast = model(inputs).frame_logits
with torch.enable_grad():
    plain = model(inputs).frame_logits.detach()
torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
print("first call ran")
"""


def test_the_first_call_on_a_new_machine_may_be_in_inference_mode(tmp_path):
    """A new machine measures its GEMM plan on the first engine call; in inference mode (the annotator's, the
    pipelines') that measurement failed ('Inference tensors do not track version counter'), on every run."""
    env = {**os.environ, "HTSAT_HF_CACHE": str(tmp_path / "new-machine"), "HTSAT_HF_NATIVE_KERNELS": "0",
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", FIRST_CALL_IN_INFERENCE_MODE], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "first call ran" in result.stdout
    assert list((tmp_path / "new-machine").glob("linear-plan-*.json"))  # measured once, kept for the next process


def test_a_model_built_in_inference_mode_runs_the_engine_and_sees_in_place_changes(monkeypatch):
    """Its weights and buffers are inference tensors, which keep no version counter: the engine keeps nothing derived
    from them (packed weights, masks), so an in-place change made in inference mode is seen by the next call."""
    torch.manual_seed(2)
    reference = HTSATForSoundEventDetection(tiny_config()).eval()
    with torch.inference_mode():
        model = HTSATForSoundEventDetection(tiny_config()).eval()
        model.load_state_dict(reference.state_dict())
    assert next(model.parameters()).is_inference() and attached(model.htsat.stages[0])
    calls = count_engine_stages(monkeypatch)
    inputs = features()
    with torch.inference_mode():
        before = model(inputs).frame_logits
        model.htsat.stages[0].blocks[0].attn.qkv.weight.mul_(1.5)
        model.htsat.stages[0].blocks[0].attn.relative_position_bias_table.add_(0.5)
        after = model(inputs).frame_logits
    assert len(calls) == 2 * 4
    with torch.no_grad():
        reference.reset_kernels()
        expected_before = reference(inputs).frame_logits
        reference.htsat.stages[0].blocks[0].attn.qkv.weight.mul_(1.5)
        reference.htsat.stages[0].blocks[0].attn.relative_position_bias_table.add_(0.5)
        expected_after = reference(inputs).frame_logits
    torch.testing.assert_close(before, expected_before, **TOLERANCE)
    torch.testing.assert_close(after, expected_after, **TOLERANCE)
    assert not torch.allclose(before, after, **TOLERANCE)


@pytest.mark.parametrize("chunk_elements, chunks", [(32 * 64 * 8, (8, 4, 2)), (256 * 64 * 8, (64, 32, 16))])
def test_chunked_cpu_inference_equals_the_whole_tensor_path(monkeypatch, chunk_elements, chunks):
    """No-grad CPU inference runs blocks on chunks of windows in place: slices of the shift mask for chunks inside an
    image, repeats for chunks of several images, a short last chunk. It must equal the grad-mode path, and the
    hidden states it returns must not be overwritten by later in-place updates."""
    monkeypatch.setattr(layers, "CHUNK_HIDDEN_ELEMENTS", chunk_elements)
    torch.manual_seed(3)
    model = HTSATForSoundEventDetection(tiny_config(depths=[2, 2, 2, 1])).eval()
    assert tuple(layers.windows_per_chunk(model.htsat.stages[stage].blocks[1]) for stage in range(3)) == chunks
    inputs = features(batch=3)
    with torch.no_grad():
        chunked = model(inputs, output_hidden_states=True)
    with torch.enable_grad():
        whole = model(inputs, output_hidden_states=True)
    torch.testing.assert_close(chunked.frame_logits, whole.frame_logits, **TOLERANCE)
    for ours, reference in zip(chunked.hidden_states, whole.hidden_states, strict=True):
        torch.testing.assert_close(ours, reference.detach(), **TOLERANCE)


def test_cpu_inference_runs_no_block_forward(monkeypatch):
    """In CPU inference a stage's blocks read their windows from the grid-ordered tokens and write them back: no
    block forward (roll, partition, reverse), and the same outputs as the definition."""
    torch.manual_seed(4)
    model = HTSATForSoundEventDetection(tiny_config(depths=[2, 2, 2, 1])).eval()
    inputs = features(batch=2)
    with torch.enable_grad():
        reference = model(inputs, output_hidden_states=True)

    def refuse(*args, **kwargs):
        raise AssertionError("a block's own forward ran in CPU inference")

    monkeypatch.setattr(modeling_htsat.HTSATSwinBlock, "forward", refuse)
    with torch.no_grad():
        chunked = model(inputs, output_hidden_states=True)
    torch.testing.assert_close(chunked.frame_logits, reference.frame_logits, **TOLERANCE)
    for ours, theirs in zip(chunked.hidden_states, reference.hidden_states, strict=True):
        torch.testing.assert_close(ours, theirs.detach(), **TOLERANCE)


@pytest.mark.parametrize("chunk_elements, chunks", [(10 * 64, 5), (2048 * 384, 1)])  # 10 merged tokens a chunk: 48 in 5
def test_patch_merging_in_chunks_equals_concatenating_the_whole_grid(monkeypatch, chunk_elements, chunks):
    monkeypatch.setattr(layers, "CHUNK_HIDDEN_ELEMENTS", chunk_elements)
    torch.manual_seed(6)
    merging = attach(modeling_htsat.HTSATPatchMerging(tiny_config(), 16, 8).eval())
    assert attached(merging)
    torch.nn.init.normal_(merging.norm.bias)
    hidden = torch.randn(3, 64, 16)
    with torch.enable_grad():
        whole = merging(hidden)
    calls = []
    monkeypatch.setattr(layers, "merge_norm", lambda *a, **k: calls.append(1) or merge_norm(*a, **k))
    with torch.no_grad():
        chunked = merging(hidden)
    assert len(calls) == (chunks if native.native_library() is not None else 0)
    torch.testing.assert_close(chunked, whole.detach(), **TOLERANCE)


def test_token_semantic_head_gemm_equals_its_convolution():
    torch.manual_seed(2)
    model = HTSATForSoundEventDetection(tiny_config()).eval()
    tokens = torch.randn(3, model.classifier.grid ** 2, model.config.hidden_size)
    with torch.no_grad():
        fast = model.classifier(tokens)
    torch.testing.assert_close(fast, modeling_htsat.HTSATTokenSemanticHead.forward(model.classifier, tokens),
                               **TOLERANCE)


def test_set_attn_implementation_switches_the_attention_path(monkeypatch):
    torch.manual_seed(0)
    model = HTSATForAudioClassification(
        HTSATConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], num_labels=3)
    ).eval()
    calls = {"sdpa": 0, "eager": 0, "fused": 0}
    sdpa, eager = torch.nn.functional.scaled_dot_product_attention, modeling_htsat.eager_attention_forward
    fused = layers.window_attention

    def counting(name, function):
        def counted(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return counted

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting("sdpa", sdpa))
    monkeypatch.setattr(modeling_htsat, "eager_attention_forward", counting("eager", eager))
    monkeypatch.setattr(layers, "window_attention", counting("fused", fused))
    # the default "sdpa" takes the fused CPU kernel in fp32 CPU inference where it is available, SDPA elsewhere
    default_path = "fused" if native.native_library() is not None else "sdpa"
    inputs = torch.randn(1, 1001, 64)
    with torch.no_grad():
        default = model(inputs).logits
        assert calls[default_path] > 0 and sum(calls.values()) == calls[default_path]
        model.set_attn_implementation("eager")
        calls.update(sdpa=0, eager=0, fused=0)
        eager_logits = model(inputs).logits
        assert calls["eager"] > 0 and sum(calls.values()) == calls["eager"]
        model.set_attn_implementation("sdpa")
        calls.update(sdpa=0, eager=0, fused=0)
        model(inputs)
        assert calls[default_path] > 0 and sum(calls.values()) == calls[default_path]
    torch.testing.assert_close(eager_logits, default, **TOLERANCE)


def test_stages_update_handed_over_tokens_in_place_only(monkeypatch):
    """A stage updates its input in place where the layer before handed it over, and not while hidden states are
    collected (the first one is that input)."""
    model = HTSATForSoundEventDetection(tiny_config()).eval()
    in_place = []
    real = layers.stage_blocks
    monkeypatch.setattr(layers, "stage_blocks",
                        lambda stage, hidden, in_place_=False, **kw: in_place.append(kw.get("in_place", in_place_))
                        or real(stage, hidden, **kw))
    with torch.no_grad():
        model(features())
        assert in_place == [True] * 4
        in_place.clear()
        model(features(), output_hidden_states=True)
        assert in_place == [False] * 4


def test_ensemble_members_get_the_engine(monkeypatch):
    from htsat_hf import HTSATEnsembleModel

    torch.manual_seed(5)
    members = [HTSATForSoundEventDetection(tiny_config()).eval() for _ in range(2)]
    ensemble = HTSATEnsembleModel.from_members(members)
    assert all(attached(member.htsat.stages[0]) and attached(member.classifier) for member in ensemble.members)
    calls = count_engine_stages(monkeypatch)
    with torch.no_grad():
        ensemble(features())
    assert len(calls) == 8
