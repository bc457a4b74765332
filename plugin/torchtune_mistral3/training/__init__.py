from ._grad_norm import clip_grad_norm_
from ._launch import check_checkpoint_dir, check_world_size, ensure_single_process_env
from ._lr_schedulers import cosine_with_warmup
from ._metric_logging import prepare_metric_logger_env
from ._parallel_dims import ParallelDims, validate_pipeline_stages, validate_tensor_parallel
from ._pipeline import (
    Pipeline,
    PipelineLoss,
    StageImages,
    balanced_layer_split,
    build_pipeline,
    cut_pipeline_stage,
    default_stages_per_rank,
    get_pipeline_schedule_class,
    is_stage_stand_in,
    pipeline_step,
    resolve_layer_split,
    set_fsdp_gradient_sum,
    stage_ids_for_rank,
    validate_pipeline_schedule,
)
from ._precision import (
    PrecisionPolicy,
    StochasticRoundingAdamW,
    convert_to_fp8,
    precision_policy,
    shard_model,
)
from ._stock import load_stock_recipe, stock_recipe_path
from ._tp import apply_tensor_parallel, resolve_tp_plan, train_context, uses_loss_parallel
from ._training_state import latest_training_state, load_training_state, save_training_state

__all__ = [
    "apply_tensor_parallel",
    "balanced_layer_split",
    "build_pipeline",
    "check_checkpoint_dir",
    "check_checkpoint_dir",
    "check_world_size",
    "clip_grad_norm_",
    "convert_to_fp8",
    "cosine_with_warmup",
    "cut_pipeline_stage",
    "default_stages_per_rank",
    "ensure_single_process_env",
    "get_pipeline_schedule_class",
    "is_stage_stand_in",
    "load_stock_recipe",
    "ParallelDims",
    "Pipeline",
    "pipeline_step",
    "precision_policy",
    "PrecisionPolicy",
    "PipelineLoss",
    "prepare_metric_logger_env",
    "resolve_layer_split",
    "resolve_tp_plan",
    "set_fsdp_gradient_sum",
    "shard_model",
    "stage_ids_for_rank",
    "StageImages",
    "StochasticRoundingAdamW",
    "stock_recipe_path",
    "train_context",
    "latest_training_state",
    "load_training_state",
    "save_training_state",
    "uses_loss_parallel",
    "validate_pipeline_schedule",
    "validate_pipeline_stages",
    "validate_tensor_parallel",
]
