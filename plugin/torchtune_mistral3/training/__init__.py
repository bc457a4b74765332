from ._cluster import check_shared_output_dir
from ._compile import compile_blocks, needs_static_shapes
from ._config_keys import check_cli_keys
from ._data_loading import compiled_graph_count, loader_worker_options
from ._grad_norm import clip_grad_norm_
from ._launch import (
    DEFAULT_DISTRIBUTED_TIMEOUT_S,
    DistributedTimeoutError,
    check_checkpoint_dir,
    check_world_size,
    command_line_overrides,
    distributed_timeout,
    ensure_single_process_env,
    explain_collective_timeouts,
    init_process_group_timeout,
    set_mesh_timeout,
)
from ._lr_schedulers import cosine_with_warmup
from ._metric_logging import prepare_metric_logger_env
from ._nonfinite import NonFiniteError, NonFiniteGuard, check_finite_for_save
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
from ._sample_index import IndexedCollate, IndexedDataset, count_step_data, pop_sample_indices
from ._step_plan import cost_balanced_stage_extras
from ._stock import load_plugin_recipe, load_stock_recipe, stock_recipe_path
from ._tower_split import assign_images, split_image_encoders, sum_split_encoder_grads, tower_mode
from ._tp import (
    apply_tensor_parallel,
    check_async_tensor_parallel,
    check_sequence_parallel_length,
    enable_async_tensor_parallel,
    resolve_tp_plan,
    train_context,
    uses_loss_parallel,
    uses_sequence_parallel,
)
from ._training_state import latest_training_state, load_training_state, save_training_state

__all__ = [
    "apply_tensor_parallel",
    "assign_images",
    "balanced_layer_split",
    "build_pipeline",
    "check_async_tensor_parallel",
    "check_sequence_parallel_length",
    "check_checkpoint_dir",
    "check_shared_output_dir",
    "check_finite_for_save",
    "check_cli_keys",
    "check_world_size",
    "clip_grad_norm_",
    "compile_blocks",
    "compiled_graph_count",
    "enable_async_tensor_parallel",
    "command_line_overrides",
    "convert_to_fp8",
    "cost_balanced_stage_extras",
    "count_step_data",
    "loader_worker_options",
    "cosine_with_warmup",
    "cut_pipeline_stage",
    "DEFAULT_DISTRIBUTED_TIMEOUT_S",
    "distributed_timeout",
    "DistributedTimeoutError",
    "default_stages_per_rank",
    "ensure_single_process_env",
    "explain_collective_timeouts",
    "get_pipeline_schedule_class",
    "IndexedCollate",
    "IndexedDataset",
    "init_process_group_timeout",
    "is_stage_stand_in",
    "load_plugin_recipe",
    "load_stock_recipe",
    "needs_static_shapes",
    "NonFiniteError",
    "NonFiniteGuard",
    "ParallelDims",
    "Pipeline",
    "pipeline_step",
    "pop_sample_indices",
    "precision_policy",
    "PrecisionPolicy",
    "PipelineLoss",
    "prepare_metric_logger_env",
    "resolve_layer_split",
    "resolve_tp_plan",
    "set_fsdp_gradient_sum",
    "set_mesh_timeout",
    "shard_model",
    "split_image_encoders",
    "stage_ids_for_rank",
    "StageImages",
    "StochasticRoundingAdamW",
    "sum_split_encoder_grads",
    "stock_recipe_path",
    "tower_mode",
    "train_context",
    "latest_training_state",
    "load_training_state",
    "save_training_state",
    "uses_loss_parallel",
    "uses_sequence_parallel",
    "validate_pipeline_schedule",
    "validate_pipeline_stages",
    "validate_tensor_parallel",
]
