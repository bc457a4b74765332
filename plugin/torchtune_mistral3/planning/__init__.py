"""Cost models of a training layout, before booking GPUs: per-GPU memory, step time, and the padding they assume.

``python -m torchtune_mistral3.plan`` is the command line (:func:`main`). The recipe takes from here only the
pipeline's cost-balanced stage split (:func:`cost_balanced_stage_extras`).
"""

from ._cli import PLAN_KEY_FILES, check_plan_values, layout_from_config, load_config, main, plan_config
from ._memory_plan import Layout, MemoryPlan, build_meta_model, model_dims, plan_memory
from ._padding_model import medpix_sample_lengths, medpix_sample_shapes
from ._step_plan import CostTable, Hardware, StepPlan, cost_balanced_stage_extras, plan_step

__all__ = [
    "PLAN_KEY_FILES",
    "CostTable",
    "Hardware",
    "Layout",
    "MemoryPlan",
    "StepPlan",
    "build_meta_model",
    "check_plan_values",
    "cost_balanced_stage_extras",
    "layout_from_config",
    "load_config",
    "main",
    "medpix_sample_lengths",
    "medpix_sample_shapes",
    "model_dims",
    "plan_config",
    "plan_memory",
    "plan_step",
]
