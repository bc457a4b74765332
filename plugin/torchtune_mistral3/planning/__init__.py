"""Cost models of a training layout, before booking GPUs: per-GPU memory, step time, and the padding they assume.

``python -m torchtune_mistral3.plan`` is the command line (:func:`main`). The recipe takes from here only the
pipeline's cost-balanced stage split (:func:`cost_balanced_stage_extras`).
"""

from ._cli import PLAN_KEY_FILES, check_plan_values, layout_from_config, load_config, main, plan_config
from ._memory_plan import build_meta_model
from ._step_plan import cost_balanced_stage_extras

__all__ = [
    "PLAN_KEY_FILES",
    "build_meta_model",
    "check_plan_values",
    "cost_balanced_stage_extras",
    "layout_from_config",
    "load_config",
    "main",
    "plan_config",
]
