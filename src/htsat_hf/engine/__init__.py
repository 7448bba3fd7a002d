"""HTS-AT's CPU inference engine, beside the model definition (`modeling_htsat`): faster forwards for the marked
layers (`layers.py`) on planned GEMMs (`linear.py`) and native kernels compiled at run time (`native.py`), attached
through Transformers' `kernels` mechanism (`attach.py`). `HTSAT_HF_ENGINE=0` switches it off."""

from .attach import ENGINE_ENVIRONMENT_VARIABLE, attach, attached, engine_enabled, kernel_mapping, register

__all__ = ["ENGINE_ENVIRONMENT_VARIABLE", "attach", "attached", "engine_enabled", "kernel_mapping", "register"]
