"""`torch.compile` gives the eager model's outputs (inference and a training step). Building the graph takes minutes
on a 2-core CPU, so the test runs only with HTSAT_SLOW_TESTS=1 (CI with more cores or a GPU should set it)."""

from __future__ import annotations

import os

import pytest
import torch

from htsat_hf import HTSATConfig, HTSATForSoundEventDetection
from htsat_hf.deployment.export import compile_model

pytestmark = pytest.mark.skipif(
    os.environ.get("HTSAT_SLOW_TESTS") != "1", reason="torch.compile takes minutes on 2 CPU cores; set HTSAT_SLOW_TESTS=1"
)

TINY = dict(embed_dim=8, depths=[1, 2, 1, 1], num_heads=[1, 2, 4, 8], num_labels=6, spec_augment=False)


def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model = HTSATForSoundEventDetection(HTSATConfig(**TINY)).eval()
    compiled = compile_model(model)
    x = torch.randn(2, 1001, 64) * 10 - 40
    with torch.no_grad():
        expected, actual = model(x), compiled(x)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual.frame_logits, expected.frame_logits, atol=1e-5, rtol=1e-5)


def test_compiled_training_step_gives_the_eager_gradients():
    torch.manual_seed(0)
    config = HTSATConfig(**TINY, drop_path_rate=0.0)
    model = HTSATForSoundEventDetection(config).train()
    x, labels = torch.randn(2, 1001, 64) * 10 - 40, (torch.rand(2, 6) > 0.5).float()
    model(x, labels=labels).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compile_model(model)(x, labels=labels).loss.backward()
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4, msg=name)
