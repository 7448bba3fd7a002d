"""The native CPU kernels (fused window attention with the qkv bias, LayerNorm with its residual and biases, bias +
GELU in place): the same numbers as float64, the model's outputs unchanged, and PyTorch's ops wherever they do not
apply (or cannot be built)."""

import contextlib
import os
import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

import htsat_hf.modeling_htsat as modeling
from htsat_hf import HTSATConfig, HTSATForAudioClassification
from htsat_hf.engine import attach, layers, native
from htsat_hf.engine.native import (
    bias_gelu_,
    build_kernels,
    copy_rows,
    fused_attention_applies,
    kernels_apply,
    layer_norm,
    merge_norm,
    window_attention,
)

buildable = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64") and shutil.which("c++")
needs_kernel = pytest.mark.skipif(
    not buildable or os.environ.get("HTSAT_HF_NATIVE_KERNELS") == "0",
    reason="the kernels are built on Linux x86-64 with a C++ compiler",
)


@pytest.fixture(scope="module")
def avx2_kernels(tmp_path_factory):
    """The kernels as built for a CPU with AVX2 but not AVX-512 (8-float vectors, 16 registers: queries in tiles of
    two vectors), whatever this CPU has."""
    try:
        return build_kernels(tmp_path_factory.mktemp("avx2_kernels"), extra_flags=("-mno-avx512f",))
    except RuntimeError as error:  # a CPU without AVX2
        pytest.skip(f"no AVX2 build here: {error}")


@pytest.fixture(params=["native", "avx2"])
def kernel_build(request, monkeypatch):
    """Each test that takes it runs on this CPU's own build and on the AVX2 one."""
    if request.param == "avx2":
        kernels = request.getfixturevalue("avx2_kernels")
        monkeypatch.setattr(native, "native_library", lambda: kernels)
    return request.param


@needs_kernel
def test_the_vector_width_follows_the_cpu(avx2_kernels):
    with open("/proc/cpuinfo") as cpuinfo:
        avx512 = " avx512f " in next(line for line in cpuinfo if line.startswith("flags")) + " "
    assert native.native_library().htsat_vector_width() == (16 if avx512 else 8)
    assert avx2_kernels.htsat_vector_width() == 8


def reference_attention(qkv: torch.Tensor, mask: torch.Tensor, heads: int, scale: float, first: int) -> torch.Tensor:
    """Attention in float64 by matmul and softmax, each window with mask[(first + w) % mask_windows]."""
    windows, tokens, width = qkv.shape
    q, k, v = qkv.double().view(windows, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    per_window = mask.double()[(first + torch.arange(windows)) % mask.shape[0]]
    weights = (q @ k.transpose(-2, -1) * scale + per_window).softmax(-1)
    return (weights @ v).transpose(1, 2).reshape(windows, tokens, width // 3)


@needs_kernel
@pytest.mark.parametrize(
    "tokens, heads, head_dim, mask_windows, first",
    [
        (64, 4, 24, 64, 0), (64, 4, 24, 64, 37), (64, 32, 24, 1, 0), (16, 2, 8, 4, 3), (32, 3, 16, 5, 9),
        (48, 1, 64, 2, 1), (64, 2, 40, 3, 2),
    ],
)
def test_kernel_matches_attention_in_float64(kernel_build, tokens, heads, head_dim, mask_windows, first):
    torch.manual_seed(0)
    qkv = torch.randn(11, tokens, 3 * heads * head_dim) * 2
    mask = torch.randn(mask_windows, heads, tokens, tokens)
    mask[..., : tokens // 3, tokens // 2 :] = modeling.SHIFT_MASK_VALUE  # shifted-window regions that never meet
    with torch.no_grad():
        assert fused_attention_applies(qkv[..., : heads * head_dim], heads, head_dim)
        fused = window_attention(qkv, mask, heads, head_dim**-0.5, first)
    expected = reference_attention(qkv, mask, heads, head_dim**-0.5, first)
    assert fused.shape == (11, tokens, heads * head_dim) and fused.dtype == torch.float32
    # as accurate as PyTorch's float32 SDPA, both measured against float64
    q, k, v = qkv.view(11, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    per_window = mask[(first + torch.arange(11)) % mask_windows]
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=per_window, scale=head_dim**-0.5)
    sdpa_error = (sdpa.transpose(1, 2).reshape(fused.shape).double() - expected).abs().max().item()
    fused_error = (fused.double() - expected).abs().max().item()
    assert fused_error <= 1.25 * sdpa_error + 1e-7 and fused_error < 1e-4, (fused_error, sdpa_error)


@needs_kernel
def test_kernel_reads_a_key_major_mask_as_it_is(kernel_build, monkeypatch):
    """The same values in either memory layout give the same context; a key-major one (how the model caches it for
    the kernel) reaches the kernel without a copy, any other is copied into that layout."""
    torch.manual_seed(2)
    qkv, mask = torch.randn(6, 64, 3 * 4 * 24), torch.randn(3, 4, 64, 64)
    key_major = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    given = []
    kernels = native.native_library()

    class Recording:  # records the mask pointer the kernel is given
        def __getattr__(self, name):
            return getattr(kernels, name)

        def htsat_window_attention(self, qkv_pointer, bias, mask_pointer, *rest):
            given.append(mask_pointer)
            return kernels.htsat_window_attention(qkv_pointer, bias, mask_pointer, *rest)

    monkeypatch.setattr(native, "native_library", Recording)
    with torch.no_grad():
        from_contiguous = window_attention(qkv, mask, 4, 24**-0.5, 1)
        from_key_major = window_attention(qkv, key_major, 4, 24**-0.5, 1)
    torch.testing.assert_close(from_key_major, from_contiguous, atol=0, rtol=0)
    assert given[0] != mask.data_ptr() and given[1] == key_major.data_ptr()
    torch.testing.assert_close(from_key_major.double(), reference_attention(qkv, mask, 4, 24**-0.5, 1), atol=1e-5, rtol=0)


@needs_kernel
@pytest.mark.parametrize("tokens, heads, head_dim, period, first", [(64, 4, 24, 16, 5), (16, 2, 8, 3, 0)])
def test_kernel_adds_window_masks_by_kind(kernel_build, tokens, heads, head_dim, period, first):
    """A per-head mask plus one of a few per-window masks chosen by kind: the attention of their sum."""
    torch.manual_seed(3)
    qkv, mask = torch.randn(9, tokens, 3 * heads * head_dim), torch.randn(1, heads, tokens, tokens)
    kinds = torch.randn(3, tokens, tokens)
    kinds[1, : tokens // 2, tokens // 2 :] = modeling.SHIFT_MASK_VALUE
    kind_of_window = torch.randint(0, 3, (period,))
    combined = mask + kinds[kind_of_window].unsqueeze(1)  # (period, heads, tokens, tokens)
    with torch.no_grad():
        fused = window_attention(qkv, mask, heads, head_dim**-0.5, first, window_masks=kinds, window_kinds=kind_of_window)
    expected = reference_attention(qkv, combined, heads, head_dim**-0.5, first)
    torch.testing.assert_close(fused.double(), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="must index the 3 window_masks"):
        window_attention(qkv, mask, heads, 0.2, window_masks=kinds, window_kinds=kind_of_window.clone().fill_(3))
    with pytest.raises(ValueError, match="go together"):
        window_attention(qkv, mask, heads, 0.2, window_masks=kinds)
    with pytest.raises(ValueError, match=r"window_masks must be float32 \(kinds"):
        window_attention(qkv, mask, heads, 0.2, window_masks=kinds[0], window_kinds=kind_of_window)


def test_shift_kinds_rebuild_the_shift_mask():
    model = HTSATForAudioClassification(HTSATConfig(num_labels=3))
    shifted = [block for stage in model.htsat.stages for block in stage.blocks if block.shift_mask is not None]
    assert shifted and all(layers.shift_kinds(block) is None for stage in model.htsat.stages for block in stage.blocks
                           if block.shift_mask is None)
    for block in shifted:
        kinds, kind_of_window = layers.shift_kinds(block)
        assert kinds.shape[0] == 4 and kinds.transpose(-1, -2).is_contiguous()  # interior, two edges, corner
        assert torch.equal(kinds[kind_of_window], block.shift_mask)
        assert layers.shift_kinds(block)[0] is kinds  # cached


def test_attention_mask_is_cached_in_each_layout():
    block = HTSATForAudioClassification(HTSATConfig(num_labels=3)).htsat.stages[0].blocks[1]
    with torch.no_grad():
        torch.nn.init.normal_(block.attn.relative_position_bias_table)
        plain = layers.attention_mask(block.attn, block.shift_mask)
        key_major = layers.attention_mask(block.attn, block.shift_mask, key_major=True)
        assert plain.is_contiguous() and key_major.transpose(-1, -2).is_contiguous()
        torch.testing.assert_close(key_major, plain, atol=0, rtol=0)
        assert layers.attention_mask(block.attn, block.shift_mask, key_major=True) is key_major
        assert layers.attention_mask(block.attn, block.shift_mask) is plain
        block.attn.relative_position_bias_table.add_(1.0)  # new weights: both layouts are computed again
        torch.testing.assert_close(layers.attention_mask(block.attn, block.shift_mask, key_major=True), key_major + 1.0)
        torch.testing.assert_close(layers.attention_mask(block.attn, block.shift_mask), plain + 1.0)


@needs_kernel
@pytest.mark.parametrize("tokens, heads, head_dim, mask_windows", [(64, 4, 24, 64), (32, 3, 16, 5), (16, 2, 8, 1)])
def test_kernel_applies_the_qkv_bias(kernel_build, tokens, heads, head_dim, mask_windows):
    """A projection computed without its bias, plus the bias given to the kernel: the same attention as on the
    biased projection (q's added to the queries, v's to the context, k's cancelled by the softmax)."""
    torch.manual_seed(1)
    width = 3 * heads * head_dim
    qkv, bias = torch.randn(5, tokens, width), torch.randn(width) * 2
    mask = torch.randn(mask_windows, heads, tokens, tokens)
    with torch.no_grad():
        fused = window_attention(qkv, mask, heads, head_dim**-0.5, 2, qkv_bias=bias)
        unbiased = window_attention(qkv, mask, heads, head_dim**-0.5, 2)
    expected = reference_attention(qkv + bias, mask, heads, head_dim**-0.5, 2)
    assert (fused.double() - expected).abs().max() < 1e-5
    assert (unbiased.double() - expected).abs().max() > 0.1  # the bias matters here
    with pytest.raises(ValueError, match=f"qkv_bias must be float32 of shape \\({width},\\)"):
        window_attention(qkv, mask, heads, 0.2, qkv_bias=bias[:-1])


@needs_kernel
@pytest.mark.parametrize("batch", [1, 3])
def test_model_outputs_equal_the_sdpa_path(kernel_build, monkeypatch, batch):
    """The paper-size model (shifted windows, chunks that start inside an image, every stage) gives the same logits
    with the kernels as through PyTorch's ops."""
    torch.manual_seed(0)
    model = HTSATForAudioClassification(HTSATConfig(num_labels=10)).eval()
    features = torch.randn(batch, 1001, 64)
    for module in model.modules():  # biases are zero at initialisation: give the fused ones something to do
        if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.5)
    calls = []
    monkeypatch.setattr(
        layers, "window_attention", lambda *args, **kwargs: calls.append(1) or window_attention(*args, **kwargs)
    )
    with torch.no_grad():
        fused = model(features).logits
        assert len(calls) > 0
        with native.torch_ops_instead():
            calls.clear()
            plain = model(features).logits
            assert not calls
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_quantised_model_keeps_its_layers_biases(monkeypatch):
    """int8 layers apply their own biases, so the fused path leaves them there: the same logits as PyTorch's ops."""
    from htsat_hf.deployment.export import quantize_dynamic_int8

    torch.manual_seed(0)
    model = HTSATForAudioClassification(HTSATConfig(num_labels=10)).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.5)
    quantised = quantize_dynamic_int8(model)
    features = torch.randn(2, 1001, 64)
    calls = []
    monkeypatch.setattr(
        layers, "window_attention", lambda *args, **kwargs: calls.append(kwargs) or window_attention(*args, **kwargs)
    )
    with torch.no_grad():
        fused = quantised(features).logits
        assert calls and all(call["qkv_bias"] is None for call in calls)
        with native.torch_ops_instead():
            plain = quantised(features).logits
        reference = model(features).logits
    # the attention kernel's last-bit differences move some activations into the next int8 step (0.5 % of the largest
    # logit here); a bias left out or added twice moves the logits by about their own size
    assert (fused - plain).abs().max() < 0.02 * reference.abs().max(), (fused - plain).abs().max()
    assert (fused - reference).abs().max() < 0.2 * reference.std()  # int8, and its biases kept


@needs_kernel
def test_plain_path_where_the_kernel_does_not_apply():
    from torch.utils.flop_counter import FlopCounterMode

    windows = torch.randn(4, 64, 96)
    assert not fused_attention_applies(windows.requires_grad_(), 4, 24)  # autograd needs SDPA's backward
    windows = windows.detach()
    assert not fused_attention_applies(windows, 4, 24, torch.zeros(3, requires_grad=True))  # nor a parameter's
    with torch.no_grad():
        assert fused_attention_applies(windows, 4, 24)
        assert not fused_attention_applies(windows.double(), 4, 24)
        assert not fused_attention_applies(torch.randn(4, 49, 96), 4, 24)  # 7 x 7 windows
        assert not fused_attention_applies(windows, 8, 12)  # heads not a multiple of 8 wide
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fused_attention_applies(windows, 4, 24)
        with FlopCounterMode(display=False):  # it would not see the C call and count nothing
            assert not fused_attention_applies(windows, 4, 24)


@needs_kernel
def test_bad_arguments_are_refused():
    qkv = torch.randn(2, 64, 3 * 96)
    with pytest.raises(ValueError, match=r"mask must be \(mask_windows, 4, 64, 64\)"):
        window_attention(qkv, torch.zeros(1, 3, 64, 64), 4, 0.2)
    with pytest.raises(TypeError, match="float32"):
        window_attention(qkv.double(), torch.zeros(1, 4, 64, 64), 4, 0.2)
    with pytest.raises(ValueError, match="does not take 49 tokens"):
        window_attention(torch.randn(2, 49, 3 * 96), torch.zeros(1, 4, 49, 49), 4, 0.2)


@needs_kernel
def test_build_is_cached_and_a_missing_compiler_falls_back(tmp_path, monkeypatch, caplog):
    first = build_kernels(tmp_path)
    built = list(tmp_path.glob("htsat_kernels-*.so"))
    assert len(built) == 1 and first._name == str(built[0])
    stamp = built[0].stat().st_mtime_ns
    assert build_kernels(tmp_path)._name == first._name and built[0].stat().st_mtime_ns == stamp  # not rebuilt
    assert not list(tmp_path.glob("tmp*"))  # no scratch left behind

    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-compiler-here'"):
        build_kernels(tmp_path / "other")
    monkeypatch.setenv("HTSAT_HF_CACHE", str(tmp_path / "other"))
    native.native_library.cache_clear()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.enable_propagation()
        with caplog.at_level("WARNING"):
            assert native.native_library() is None
            assert not fused_attention_applies(torch.randn(2, 64, 96), 4, 24)
        assert "native CPU kernels are off, PyTorch's ops run instead: no C++ compiler" in caplog.text
        model = HTSATForAudioClassification(
            HTSATConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1])
        ).eval()
        with torch.no_grad():
            assert torch.isfinite(model(torch.randn(1, 1001, 64)).logits).all()  # SDPA runs instead
    finally:
        hf_logging.disable_propagation()
        native.native_library.cache_clear()


SKLEARN_FIRST = """
import sklearn.ensemble  # brings scikit-learn's own OpenMP runtime, libgomp-<hash>.so, into the process first
from htsat_hf.engine import native
kernels = native.native_library()
assert kernels is not None, "the kernels were switched off"
assert native.openmp_runtime(kernels) == native.torch_openmp_runtime() is not None
print(native.openmp_runtime(kernels))
"""


@needs_kernel
def test_the_kernels_run_on_pytorchs_openmp_even_after_scikit_learn(tmp_path):
    """scikit-learn loads a second, renamed libgomp; the kernels still bind to PyTorch's, so they stay on (the README's
    main job imports scikit-learn before its pipeline call)."""
    import subprocess
    import sys

    pytest.importorskip("sklearn")
    result = subprocess.run([sys.executable, "-c", SKLEARN_FIRST], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HTSAT_HF_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "native CPU kernels are off" not in result.stderr
    assert result.stdout.strip().endswith("libgomp.so.1")


@needs_kernel
def test_kernels_on_another_openmp_runtime_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "torch_openmp_runtime", lambda: "/elsewhere/libiomp5.so")
    with pytest.raises(RuntimeError, match=r"OpenMP runtime .*libgomp.* not on PyTorch's \(/elsewhere/libiomp5.so\)"):
        build_kernels(tmp_path)


@needs_kernel
def test_a_compile_error_says_what_the_compiler_said(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "KERNEL_SOURCE", "this is not C++")
    with pytest.raises(RuntimeError, match="failed to compile the kernels"):
        build_kernels(tmp_path)
    assert not list(tmp_path.glob("*.so"))


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("HTSAT_HF_NATIVE_KERNELS", "0")
    native.native_library.cache_clear()
    try:
        assert native.native_library() is None
        with torch.no_grad():
            assert not fused_attention_applies(torch.randn(2, 64, 96), 4, 24)
    finally:
        monkeypatch.delenv("HTSAT_HF_NATIVE_KERNELS")
        native.native_library.cache_clear()


@needs_kernel
@pytest.mark.parametrize("dim", [96, 768, 20])  # 20: a row no vector width divides
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm_matches_float64(kernel_build, dim, with_residual):
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(dim, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    hidden = torch.randn(7, 33, dim) * 3 + 1
    residual = torch.randn(7, 33, dim) if with_residual else None
    expected_hidden = hidden.double() + (residual.double() if with_residual else 0)
    expected = torch.nn.functional.layer_norm(expected_hidden, (dim,), norm.weight.double(), norm.bias.double(), 1e-5)
    with torch.no_grad():
        assert kernels_apply(hidden)
        output = layer_norm(hidden, norm, residual)
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.double(), expected_hidden)  # the residual was added in place


@needs_kernel
@pytest.mark.parametrize("dim", [96, 20])
def test_layer_norm_adds_the_residual_bias_and_carries_a_later_bias(kernel_build, dim):
    """x += residual + residual_bias; out = norm(x); x += carry_bias (the kernel, and PyTorch's ops alike)."""
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(dim)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    hidden, residual = torch.randn(50, dim) * 2, torch.randn(50, dim)
    residual_bias, carry_bias = torch.randn(dim), torch.randn(dim)
    added = hidden.double() + residual.double() + residual_bias.double()
    expected = torch.nn.functional.layer_norm(added, (dim,), norm.weight.double(), norm.bias.double(), 1e-5)
    for use_kernels in (True, False):
        with torch.no_grad(), (contextlib.nullcontext() if use_kernels else native.torch_ops_instead()):
            assert kernels_apply(hidden) == use_kernels
            x = hidden.clone()
            output = layer_norm(x, norm, residual, residual_bias, carry_bias=carry_bias)
        torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.double(), added + carry_bias.double(), rtol=1e-6, atol=1e-6)  # 3 fp32 adds
    with pytest.raises(ValueError, match="pass the residual too"):
        layer_norm(hidden, norm, residual_bias=residual_bias)
    with pytest.raises(ValueError, match=rf"carry_bias must have shape \({dim},\)"):
        layer_norm(hidden, norm, carry_bias=carry_bias[:-1])


@needs_kernel
def test_bias_gelu_is_the_exact_gelu_in_place(kernel_build):
    """As accurate as PyTorch's float32 GELU against float64 (both use a 1.5e-7 erf), over the whole range."""
    x = torch.linspace(-12, 12, 200_001)
    expected = torch.nn.functional.gelu(x.double())
    torch_error = (torch.nn.functional.gelu(x).double() - expected).abs().max().item()
    with torch.no_grad():
        y = x.clone()
        assert bias_gelu_(y) is y
    assert (y.double() - expected).abs().max().item() <= 1.25 * torch_error
    assert (y - torch.nn.functional.gelu(x, approximate="tanh")).abs().max() > 1e-4  # the exact form, not tanh
    torch.manual_seed(0)
    hidden, bias = torch.randn(9, 20) * 3, torch.randn(20)  # 20: a row no vector width divides
    expected = torch.nn.functional.gelu(hidden.double() + bias.double())
    for use_kernels in (True, False):
        with torch.no_grad(), (contextlib.nullcontext() if use_kernels else native.torch_ops_instead()):
            torch.testing.assert_close(bias_gelu_(hidden.clone(), bias).double(), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="does not match the last axis"):
        bias_gelu_(hidden, bias[:-1])


@needs_kernel
@pytest.mark.parametrize("dim", [96, 20])
def test_copy_rows_moves_rows_by_index(kernel_build, dim):
    """target[target_rows] = source[source_rows], either index left out, with the kernel and with PyTorch's ops."""
    torch.manual_seed(0)
    source = torch.randn(40, dim)
    source_rows, target_rows = torch.randperm(40)[:25], torch.randperm(30)[:25]
    for use_kernels in (True, False):
        with torch.no_grad(), (contextlib.nullcontext() if use_kernels else native.torch_ops_instead()):
            assert kernels_apply(source) == use_kernels
            gathered = copy_rows(source, torch.empty(25, dim), source_rows)
            assert torch.equal(gathered, source[source_rows])
            scattered = torch.zeros(30, dim)
            assert copy_rows(source[:25], scattered, None, target_rows) is scattered
            expected = torch.zeros(30, dim)
            expected[target_rows] = source[:25]
            assert torch.equal(scattered, expected)
            both = torch.zeros(30, dim)
            copy_rows(source, both, source_rows, target_rows)
            expected = torch.zeros(30, dim)
            expected[target_rows] = source[source_rows]
            assert torch.equal(both, expected)
    with pytest.raises(ValueError, match="25 source rows do not match 24"):
        copy_rows(source, torch.empty(24, dim), source_rows)


@needs_kernel
@pytest.mark.parametrize("dim", [96, 20])
def test_merge_norm_is_patch_merging_up_to_its_linear_layer(kernel_build, dim):
    """The 2 x 2 neighbourhoods concatenated in the model's order and LayerNorm'ed over 4 * dim, for any run of merged
    tokens (across images too), as float64 computes it, with the kernel and with PyTorch's ops."""
    torch.manual_seed(0)
    batch, grid = 3, 8
    norm = torch.nn.LayerNorm(4 * dim)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    hidden = torch.randn(batch, grid * grid, dim) * 2 + 1
    image = hidden.double().view(batch, grid, grid, dim)
    merged = torch.cat([image[:, 0::2, 0::2], image[:, 1::2, 0::2], image[:, 0::2, 1::2], image[:, 1::2, 1::2]], -1)
    expected = torch.nn.functional.layer_norm(
        merged.reshape(-1, 4 * dim), (4 * dim,), norm.weight.double(), norm.bias.double(), norm.eps
    )
    for use_kernels in (True, False):
        with torch.no_grad(), (contextlib.nullcontext() if use_kernels else native.torch_ops_instead()):
            torch.testing.assert_close(merge_norm(hidden, grid, norm).double(), expected, rtol=1e-5, atol=1e-5)
            out = torch.empty(19, 4 * dim)
            assert merge_norm(hidden, grid, norm, 10, 19, out=out) is out  # from inside image 0 into image 1
            torch.testing.assert_close(out.double(), expected[10:29], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside the 48 there are"):
        merge_norm(hidden, grid, norm, 40, 9)
    with pytest.raises(ValueError, match="not an even grid of 7 x 7"):
        merge_norm(torch.randn(1, 49, dim), 7, norm)


@pytest.mark.parametrize("frames", [1001, 500, 2])
def test_stretch_taps_are_pytorchs_bicubic_stretch(frames):
    """Applied by gathering, the taps give what `F.interpolate` gives, edges (where clamping repeats frames) included."""
    torch.manual_seed(0)
    features = torch.randn(3, 1, frames, 8)
    index, weight = native.stretch_taps(frames, 1024)
    assert index.shape == weight.shape == (1024, 4) and int(index.min()) == 0 and int(index.max()) == frames - 1
    stretched = (features[:, :, index] * weight[:, :, None]).sum(3)
    expected = F.interpolate(features, (1024, 8), mode="bicubic", align_corners=True)
    torch.testing.assert_close(stretched, expected, rtol=0, atol=2e-6)
    index, weight = native.stretch_taps(1024, 1024)  # nothing to stretch: each frame itself
    assert torch.equal(index.flatten(), torch.arange(1024)) and torch.equal(weight, torch.ones(1024, 1))
    with pytest.raises(ValueError, match="2 to 1023 frames"):
        native.stretch_taps(1, 1024)


@needs_kernel
@pytest.mark.parametrize("frames, mel", [(1001, 64), (1024, 64), (333, 32), (2, 64)])
def test_fold_image_is_fold_spectrogram(kernel_build, frames, mel):
    """The image from one pass of the kernel: the stretch, the cut into pieces and their stacking of PyTorch's ops,
    within float32 rounding, and bit for bit where nothing is stretched; strided inputs too."""
    torch.manual_seed(0)
    config = HTSATConfig(num_mel_bins=mel)
    features = torch.randn(3, 1, frames, mel) * 3
    strided = torch.randn(3, 1, frames + 5, mel)[:, :, 5:]  # not contiguous: batch and time strides of its own
    target, ratio = config.image_frames, config.freq_ratio
    with torch.no_grad():
        assert native.fold_image_applies(features, target, ratio)
        with native.torch_ops_instead():
            expected = modeling.fold_spectrogram(features, config)
            expected_strided = modeling.fold_spectrogram(strided, config)
        image = native.fold_image(features, target, ratio)
        assert image.shape == (3, 1, 256, 256) and image.is_contiguous()
        if frames == 1024:
            assert torch.equal(image, expected)
        torch.testing.assert_close(image, expected, rtol=0, atol=4e-6)
        torch.testing.assert_close(native.fold_image(strided, target, ratio), expected_strided, rtol=0, atol=4e-6)
        calls = []
        original = native.fold_image
        fold = attach(modeling.HTSATSpectrogramFold(config).eval())  # the engine's fold layer takes the kernel
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(layers, "fold_image", lambda *args: calls.append(1) or original(*args))
            torch.testing.assert_close(fold(features), expected, rtol=0, atol=4e-6)
        assert calls == [1]


@needs_kernel
def test_fold_image_applies_only_where_it_can():
    features = torch.randn(2, 1, 1001, 64)
    with torch.no_grad():
        assert not native.fold_image_applies(features.double(), 1024, 4)
        assert not native.fold_image_applies(torch.randn(2, 1, 1001, 60), 1024, 4)  # mel not a multiple of 8
        assert not native.fold_image_applies(torch.randn(2, 1, 1025, 64), 1024, 4)  # more than one image
        assert not native.fold_image_applies(features, 1000, 4)  # pieces of 250 frames
        with pytest.raises(ValueError, match=r"does not take features \(2, 1, 1001, 60\)"):
            native.fold_image(torch.randn(2, 1, 1001, 60), 1024, 4)
    wanting_gradients = features.clone().requires_grad_()
    assert not native.fold_image_applies(wanting_gradients, 1024, 4)
    image = modeling.fold_spectrogram(wanting_gradients, HTSATConfig())  # PyTorch's ops, so gradients flow
    image.sum().backward()
    assert wanting_gradients.grad is not None


def test_onnx_export_check_reads_what_pytorch_reads(monkeypatch):
    """The fast check agrees with `torch.onnx.is_in_onnx_export` whichever exporter's flag is set."""
    assert native.in_onnx_export() is torch.onnx.is_in_onnx_export() is False
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        pytest.skip("this PyTorch keeps its ONNX export flags elsewhere: the public function is used")
    for holder, name in ((_flags, "_is_onnx_exporting"), (GLOBALS, "in_onnx_export")):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(holder, name, True)
            assert torch.onnx.is_in_onnx_export() and native.in_onnx_export()
            with torch.no_grad():
                assert not kernels_apply(torch.randn(2, 8))


def test_layer_norm_takes_torch_ops_where_the_kernel_does_not_apply():
    norm = torch.nn.LayerNorm(16)
    hidden, residual = torch.randn(4, 16), torch.randn(4, 16)
    expected = norm(hidden + residual)
    output = layer_norm(hidden.clone(), norm, residual)  # autograd on: the weight wants its gradient
    assert output.grad_fn is not None
    torch.testing.assert_close(output, expected)
    with torch.no_grad():
        strided = torch.randn(16, 4).t()  # not contiguous
        torch.testing.assert_close(layer_norm(strided, norm), norm(strided))
        with pytest.raises(ValueError, match="does not match"):
            layer_norm(hidden, norm, torch.randn(4, 8))
