"""Attaches the CPU engine (`layers.py`) to HTS-AT models through Transformers' own layer-swapping mechanism.

`modeling_htsat` marks the layers the engine speeds up with `use_kernel_forward_from_hub` names (`faster_forward`).
`register()` (run once when `htsat_hf` is imported):
- registers a `kernels` mapping from those names to the layer classes of `layers.py`, for CPU inference, through a
  repository object whose `load` returns a class of this package (no Hub, no download: it works with
  HF_HUB_OFFLINE=1), so that Transformers' own `kernelize` calls (`from_pretrained`, `set_use_kernels`, the mode
  switch of `train()` / `eval()` on a kernelized model) swap them in, and `model.reset_kernels()` takes them out;
- lists the names in `modeling_htsat.KERNELIZED_LAYERS` (the markers' condition: without it, as in a remote-code
  folder used without this package, `kernelize` leaves the layers alone instead of warning about a missing mapping);
- adds `attach` to `modeling_htsat.POST_INIT_HOOKS`, so that a model built directly
  (`HTSATForSoundEventDetection(config)`) gets the engine too: `from_pretrained` kernelizes only the models it loads.

`attach` is `kernels.kernelize(model, mode=Mode.INFERENCE, device="cpu")` with this mapping alone. The layers are
attached whatever the model's mode or device: each replacement forward checks once per call that it applies (fp32
CPU inference without gradients, see `layers.engine_applies`) and otherwise runs the definition's forward, so
training, GPU, `torch.compile` and ONNX export run the definition. (Transformers' `kernelize` on a model moved to a
GPU with a device map, or switched to training mode, puts the definition's forwards back itself.)

The switch: `HTSAT_HF_ENGINE=0` in the environment when `htsat_hf` is imported leaves the engine out (nothing is
registered): every model runs the definition's forwards. On a live model, `model.reset_kernels()` takes it out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn
from transformers.utils import logging

from .. import modeling_htsat
from .layers import LAYERS

logger = logging.get_logger(__name__)

ENGINE_ENVIRONMENT_VARIABLE = "HTSAT_HF_ENGINE"


def engine_enabled() -> bool:
    """False where `HTSAT_HF_ENGINE` is 0 / false / no / off."""
    return os.environ.get(ENGINE_ENVIRONMENT_VARIABLE, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class PackageLayer:
    """A `kernels` layer repository that is a class of this package: `load` returns it (nothing is downloaded)."""

    layer_name: str

    def load(self) -> type[nn.Module]:
        return LAYERS[self.layer_name]


def kernel_mapping() -> dict:
    """The `kernels` mapping: each marked layer name -> its engine layer, on CPU, for inference."""
    from kernels import Mode

    return {name: {"cpu": {Mode.INFERENCE: PackageLayer(name)}} for name in LAYERS}


def kernels_available() -> bool:
    try:
        import kernels  # noqa: F401
    except ImportError:
        return False
    return True


def attach(model: nn.Module) -> nn.Module:
    """Swaps the engine's forwards into the marked layers of `model` (any module); returns the model."""
    if not kernels_available():
        return model
    from kernels import Mode, kernelize, use_kernel_mapping

    with use_kernel_mapping(kernel_mapping(), inherit_mapping=False):
        kernelize(model, mode=Mode.INFERENCE, device="cpu")
    return model


def attached(module: nn.Module) -> bool:
    """Whether `module` runs an engine forward."""
    forward = module.__dict__.get("forward")
    return forward is not None and getattr(forward, "__func__", None) in {layer.forward for layer in LAYERS.values()}


def register() -> None:
    """Registers the engine once per process (see the module docstring); nothing where it is switched off or where
    the `kernels` package is missing."""
    if not engine_enabled() or attach in modeling_htsat.POST_INIT_HOOKS:
        return
    if not kernels_available():
        logger.warning(
            "HTS-AT's CPU engine is off: the `kernels` package, through which it attaches, is not installed "
            "(pip install 'kernels>=0.19'); the model definition runs instead."
        )
        return
    from kernels import register_kernel_mapping

    register_kernel_mapping(kernel_mapping())
    modeling_htsat.KERNELIZED_LAYERS.update(LAYERS)
    modeling_htsat.POST_INIT_HOOKS.append(attach)
