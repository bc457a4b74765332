"""The full fine-tuning recipe: torchtune's ``full_finetune_distributed``, extended for Mistral 3 VLMs.

``tune run full_finetune_distributed`` (recipes/full_finetune_distributed.py) runs :class:`Mistral3FullFinetuneRecipe`
for configs whose model comes from ``torchtune_mistral3``; every other config runs the stock recipe unchanged.

What the subclass adds to the stock recipe:

- one-process runs without torchrun flags (``tune run full_finetune_distributed --config X``), and an
  immediate, actionable error when the config's parallel layout needs more processes than were launched;
- CPU runs (gloo): no CUDA-only memory calls;
- lazy loading from the plugin's FP8-aware checkpointer, each rank reading only what it owns;
- a 3-D (pipeline, data, tensor) mesh: ``pipeline_parallel_dim``, ``tensor_parallel_dim``, data parallel
  takes the rest of the world size; ``pipeline_schedule``, ``pipeline_microbatches``;
- under TP the vision tower and projector encode only this rank's share of the images, the features are
  all-gathered and the encoder gradients summed over the TP group (``tensor_parallel_tower``);
- gradient-norm clipping that is correct under TP, PP and FSDP together;
- ``compile`` per transformer block after TP and activation checkpointing (torchtitan's order); under TP the
  decoder blocks have static shapes and batches are padded to ``tokenizer.max_seq_len``;
- sequence parallelism (``tensor_parallel_plan.sequence_parallel=True``): the residual stream between the TP
  blocks sharded on the sequence; batches are padded to a multiple of ``tensor_parallel_dim``; on top of it
  torch's async TP (``tensor_parallel_async``: CUDA and ``compile`` only);
- a precision policy: ``dtype`` computes, ``master_dtype`` (default fp32) holds the parameters, gradients and
  optimizer states, ``reduce_dtype`` reduces the gradients (FSDP2's mixed precision on every layout, also with
  data parallel 1); bf16 stochastic rounding (``StochasticRoundingAdamW``); FP8 decoder linears (``fp8_recipe``);
- the loss normalised by the answer tokens of the whole global batch (all micro-batches, all replicas);
- packed datasets (``dataset.packed=True``; ``batch_size`` counts packs): the packed collate and the
  block-causal document mask on the device; every step logs samples, real tokens and padding fraction;
- freezing by builder flags (only trainable parameters reach the optimizer);
- a step whose loss or grad norm is not finite is skipped (``max_nonfinite_steps``) or stops the run with
  its step and dataset rows; a save refuses non-finite weights, so no good state is ever overwritten;
- a collective timeout (``distributed_timeout_s``) on every process group, reported with the collective;
- a progress bar with loss, learning rate, tokens per second and grad norm; validation loss every N steps;
  checkpoints every N steps and at the end, written by the checkpointer (atomically), and per-rank training
  states for an exact resume.
"""

import contextlib
import gc
import math
import os
import sys
import time
from functools import partial
from typing import Any, Dict, Iterator, List, Optional

import torch
from omegaconf import DictConfig, ListConfig
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.data import ConcatDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, modules, training, utils
from torchtune.config._utils import _get_component_from_path
from tqdm import tqdm

from torchtune_mistral3.checkpointing import load_into_module
from torchtune_mistral3.data import collate_for_dataset, config_is_packed, padded_collate_packed_mistral3
from torchtune_mistral3.models.mistral3 import (
    block_causal_mask,
    check_tokenizer_fits_model,
    packed_attention_prefers_flex,
)
from torchtune_mistral3.planning import cost_balanced_stage_extras
from torchtune_mistral3.training import (
    IndexedCollate,
    IndexedDataset,
    NonFiniteGuard,
    PipelineLoss,
    RunClaim,
    build_pipeline,
    check_async_tensor_parallel,
    check_checkpoint_dir,
    check_config_values,
    check_finite_for_save,
    check_resumable,
    check_sequence_parallel_length,
    check_shared_output_dir,
    check_world_size,
    claim_output_dir,
    clip_grad_norm_,
    command_line_overrides,
    compile_loss,
    compiled_graph_count,
    count_step_data,
    distributed_timeout,
    enable_async_tensor_parallel,
    ensure_single_process_env,
    init_process_group_timeout,
    load_stock_recipe,
    load_training_state,
    loader_worker_options,
    materialize,
    needs_static_shapes,
    parallelize_model,
    pipeline_step,
    pop_sample_indices,
    precision_policy,
    prepare_metric_logger_env,
    run_record,
    save_training_state,
    set_mesh_timeout,
    sum_split_encoder_grads,
    tower_mode,
    train_context,
    uses_loss_parallel,
    uses_sequence_parallel,
)

stock = load_stock_recipe("full_finetune_distributed")
log = utils.get_logger("INFO")


def _config_name() -> str:
    """The config as the user named it: ``tune run`` hands the recipe the resolved path of a registered name."""
    from torchtune._recipe_registry import get_all_recipes

    argv = sys.argv
    given = argv[argv.index("--config") + 1] if "--config" in argv else "<config>"
    if not os.path.isfile(given):
        return given
    for recipe in get_all_recipes():
        for c in recipe.configs:
            if os.path.isabs(c.file_path) and os.path.samefile(c.file_path, given):
                return c.name
    return given


def _prepare_checkpoint(cfg: DictConfig) -> Optional[DictConfig]:
    """The ``prepare_checkpoint`` component, or None when absent or switched off (``prepare_checkpoint=null``)."""
    node = cfg.get("prepare_checkpoint", None)
    return node if node is not None and node.get("_component_", None) is not None else None


@contextlib.contextmanager
def _fused_hidden_from_stock_check(cfg: DictConfig) -> Iterator[None]:
    """``optimizer.fused`` reads False inside the block and its own value again after it.

    torchtune 0.6.1's recipe ``__init__`` refuses ``optimizer.fused=True`` with ``tensor_parallel_dim > 1``
    ("Tensor parallelism is currently incompatible with fused optimizer"). That refusal is obsolete: torch's
    fused AdamW steps DTensor parameters (TP and FSDP2 shards alike) with the same result as foreach (see
    tests/recipes/test_tune_run_parallel_layouts.py, fused against foreach under TP 2). The stock constructor
    reads the key only for that check; ``setup`` builds the optimizer from the restored value.

    Args:
        cfg (DictConfig): the parsed config.

    Yields:
        None
    """
    optimizer = cfg.get("optimizer", None)
    fused = optimizer.get("fused", None) if optimizer is not None else None
    if not fused:
        yield
        return
    optimizer.fused = False
    try:
        yield
    finally:
        optimizer.fused = fused


def _fused_param_groups(params: List[nn.Parameter]) -> List[Dict[str, Any]]:
    """``params`` as one optimizer param group of DTensors and one of plain tensors (each only if not empty).

    A fused optimizer steps a param group in one kernel per device and dtype, and DTensor refuses a call that
    mixes DTensors with plain tensors; under TP the projector's (and tower's) parameters stay plain tensors beside
    the sharded decoder. Both groups keep the optimizer's settings, so the update is the same.

    Args:
        params (List[nn.Parameter]): the trainable parameters.

    Returns:
        List[Dict[str, Any]]: the param groups.
    """
    dtensors = [p for p in params if isinstance(p, DTensor)]
    plain = [p for p in params if not isinstance(p, DTensor)]
    return [{"params": group} for group in (dtensors, plain) if group]


class Mistral3FullFinetuneRecipe(stock.FullFinetuneRecipeDistributed):
    """Full fine-tuning of Mistral 3 vision-language models with data, tensor and pipeline parallelism.

    See the module docstring for what this adds to :class:`FullFinetuneRecipeDistributed`; every config key
    of the stock recipe keeps its meaning, except ``resume_from_checkpoint``, which continues exactly from the
    newest ``<output_dir>/training_state/step_<N>``. Extra keys: ``pipeline_parallel_dim`` (default 1),
    ``pipeline_schedule`` (default ``1F1B``), ``pipeline_microbatches`` (default: the pipeline degree),
    ``pipeline_split`` (layers per stage, default cost-balanced), ``pipeline_stages_per_rank``, ``dataset_val``,
    ``batch_size_val``, ``run_val_every_n_steps``, ``max_val_steps``, ``save_every_n_steps``,
    ``prepare_checkpoint``, ``hf_repo``, ``max_nonfinite_steps`` (default 0), ``distributed_timeout_s``
    (default 1800), ``master_dtype`` (default fp32), ``reduce_dtype`` (default: the master dtype),
    ``fp8_recipe`` (default null; tensorwise or rowwise), ``tensor_parallel_tower`` (default ``split``: each TP
    rank encodes its share of the images; ``replicate``), ``assume_shared_output_dir`` (default False),
    ``overwrite_output_dir`` (default False), ``allow_new_keys`` (see docs/configs.md).

    Args:
        cfg (DictConfig): the parsed config.
    """

    def __init__(self, cfg: DictConfig) -> None:
        check_config_values(cfg)  # counts and the learning rate, before anything is built
        check_shared_output_dir(cfg)  # a multi-node run must write where every node sees
        if _prepare_checkpoint(cfg) is None:
            check_checkpoint_dir(cfg.checkpointer.get("checkpoint_dir", None), cfg.get("hf_repo", None))
        ensure_single_process_env()
        # the layout (pp x dp x tp) on the launched processes, checked before any process group exists
        self._dims = check_world_size(cfg, config_name=_config_name(), overrides=command_line_overrides(sys.argv))
        self._distributed_timeout = distributed_timeout(cfg.get("distributed_timeout_s", None))
        with init_process_group_timeout(stock, self._distributed_timeout), _fused_hidden_from_stock_check(cfg):
            super().__init__(cfg)
        self._precision = precision_policy(cfg, self._device)
        self.data_parallel_dim = self._dims.dp
        self._loss_parallel = self._dims.tp_enabled and uses_loss_parallel(self.tensor_parallel_plan or {})
        self._static_shapes = needs_static_shapes(cfg.get("compile", False), self._dims.tp_enabled)
        # each TP rank holds s / tp tokens of the residual stream: batches padded to a multiple of the TP degree
        self._sequence_parallel = self._dims.tp_enabled and uses_sequence_parallel(self.tensor_parallel_plan or {})
        if self._sequence_parallel:
            check_sequence_parallel_length(cfg.tokenizer.get("max_seq_len", None), self._dims.tp)
        # torch's async TP: collectives overlapped with the matmuls next to them (CUDA, inductor, sequence parallel)
        self._async_tp = bool(cfg.get("tensor_parallel_async", False))
        check_async_tensor_parallel(
            self._async_tp, device_type=self._device.type, compile=cfg.get("compile", False),
            sequence_parallel=self._sequence_parallel,
        )
        # split: each TP rank encodes its share of a micro-batch's images (the features are all-gathered)
        self._tower_split = tower_mode(cfg.get("tensor_parallel_tower", None), self._dims.tp) == "split"
        self._image_free_batches_hang = False  # set by _setup_model where FSDP2 cannot reduce unused parameters
        self._packed_kernel_logged: Optional[str] = None
        if self._dims.pp_enabled and self._enable_activation_offloading:
            raise ValueError("enable_activation_offloading is not supported with pipeline_parallel_dim > 1")
        self._run_val_every_n_steps = cfg.get("run_val_every_n_steps", None)
        schedule = str(cfg.get("pipeline_schedule", "1F1B"))
        if (
            self._dims.pp_enabled
            and schedule.lower() in ("zbvzerobubble", "dualpipev")
            and self._run_val_every_n_steps
            and cfg.get("dataset_val", None) is not None
        ):
            # torch's eval of these schedules still runs backward actions: fail now, not at the first validation
            raise ValueError(
                f"pipeline_schedule={schedule} cannot run validation (forward only) in torch. Set "
                "run_val_every_n_steps=null, or use Interleaved1F1B, InterleavedZeroBubble, 1F1B or GPipe."
            )
        self._max_val_steps = cfg.get("max_val_steps", None)
        self._save_every_n_steps = cfg.get("save_every_n_steps", None)
        self._last_saved_step = None
        self._nonfinite = NonFiniteGuard(cfg.get("max_nonfinite_steps", 0), cfg.output_dir)
        self._step_rows: List[int] = []  # dataset rows of the step being taken (named if it is not finite)
        self._run: Optional[RunClaim] = None  # this run's hold on output_dir (_claim_output_dir)
        self._cfg = cfg

    # ------------------------------------------------------------------ setup

    def setup(self, cfg: DictConfig) -> None:
        """Build the model (on its mesh), tokenizer, optimizer, loss, data and schedules.

        Args:
            cfg (DictConfig): the parsed config.
        """
        self._claim_output_dir(cfg)
        if self._is_rank_zero:
            prepare_metric_logger_env(cfg.metric_logger)
            self._metric_logger = config.instantiate(cfg.metric_logger)
            self._metric_logger.log_config(cfg)

        if _prepare_checkpoint(cfg) is not None:
            # e.g. the demo's tiny FP8 checkpoint, written once by rank 0 while the others wait
            if self._is_rank_zero:
                config.instantiate(_prepare_checkpoint(cfg))
            torch.distributed.barrier()
        self._checkpointer = config.instantiate(cfg.checkpointer, should_load_recipe_state=False)
        self._compile = cfg.get("compile", False)
        self._loss_fn = config.instantiate(cfg.loss)
        if self._compile:  # dynamic shapes from the first call, static under TP (padded to max_seq_len)
            self._loss_fn = compile_loss(self._loss_fn, static_shapes=self._static_shapes, verbose=self._is_rank_zero)
        # summed cross-entropy / global label-token count; 0 (not NaN) for a micro-batch without labels
        self._step_loss = PipelineLoss(self._loss_fn, loss_parallel=self._loss_parallel)
        self._model = self._setup_model(
            cfg_model=cfg.model,
            enable_activation_checkpointing=self._enable_activation_checkpointing,
            enable_activation_offloading=self._enable_activation_offloading,
            custom_sharded_layers=cfg.get("custom_sharded_layers", None),
            fsdp_cpu_offload=self.fsdp_cpu_offload,
            reshard_after_forward=cfg.get("fsdp_reshard_after_forward", True),
            model_state_dict=None,
            ac_mode=cfg.get("ac_mode", None),
            ac_option=cfg.get("ac_option", None),
        )
        # the decoder's KV heads per rank (after TP divided them): the packed-attention kernel choice
        self._kv_heads_per_rank = next(
            m.num_kv_heads for part in self._model_parts for name, m in part.named_modules()
            if name.startswith("decoder.layers.") and isinstance(m, modules.MultiHeadAttention)
        )
        self._tokenizer = config.instantiate(cfg.tokenizer)
        # sequences of exactly max_seq_len tokens: pipeline stages, packs, compiled tensor-parallel blocks
        why = [k for k, on in (("pipeline_parallel_dim > 1", self._dims.pp_enabled),
                               ("dataset.packed=True", config_is_packed(cfg.dataset)),
                               ("compile=True with tensor_parallel_dim > 1", self._static_shapes)) if on]
        check_tokenizer_fits_model(self._tokenizer, self._model_parts, pad_to_max_seq_len=bool(why),
                                   why_padded=" and ".join(why))
        if hasattr(self._loss_fn, "num_output_chunks"):
            for part in self._model_parts:
                if self._pipeline is None or part is self._model_parts[-1] and self._pipeline.has_last:
                    part.set_num_output_chunks(self._loss_fn.num_output_chunks)

        trainable = [p for part in self._model_parts for p in part.parameters() if p.requires_grad]
        self._optimizer = config.instantiate(
            cfg.optimizer, _fused_param_groups(trainable) if cfg.optimizer.get("fused", False) else trainable
        )
        utils.log_rank_zero(
            log, f"Optimizer is initialized over {sum(p.numel() for p in trainable):,} trainable parameters on rank 0."
        )

        collate_name = cfg.get("collate_fn", "torchtune.data.padded_collate_sft")
        self._dataloader = self._setup_data(
            cfg_dataset=cfg.dataset,
            shuffle=cfg.shuffle,
            batch_size=cfg.batch_size,
            collate_fn=collate_name,
        )
        self._val_dataloader = None
        if cfg.get("dataset_val", None) is not None and self._run_val_every_n_steps:  # built only when used
            try:
                self._val_dataloader = self._setup_data(
                    cfg_dataset=cfg.dataset_val,
                    shuffle=False,
                    batch_size=cfg.get("batch_size_val", cfg.batch_size),
                    collate_fn=collate_name,
                )
            except ValueError as e:  # a bad row or file: say it is the validation set
                raise ValueError(f"dataset_val: {e}") from e

        if self._val_dataloader is not None and len(self._val_dataloader) == 0:  # else the logged val_loss is 0
            val_bs = cfg.get("batch_size_val", cfg.batch_size)
            what = "packs" if config_is_packed(cfg.dataset_val) else "samples"
            raise ValueError(
                f"dataset_val gives 0 batches of batch_size_val={val_bs} {what} per data-parallel rank (full batches "
                "only): lower batch_size_val, set dataset_val.packed=False, or remove dataset_val."
            )
        self._steps_per_epoch = len(self._dataloader) // self._gradient_accumulation_steps
        if self._steps_per_epoch == 0:
            raise ValueError(
                f"The training data gives {len(self._dataloader)} batches per data-parallel rank, fewer than "
                f"gradient_accumulation_steps={self._gradient_accumulation_steps}: lower batch_size or "
                "gradient_accumulation_steps, or add data."
            )
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < self._steps_per_epoch:
            self._steps_per_epoch = self.max_steps_per_epoch
        self.global_step = self.epochs_run * self._steps_per_epoch
        self._lr_scheduler = self._setup_lr_scheduler(
            cfg_lr_scheduler=cfg.get("lr_scheduler", None),
            num_training_steps=self.total_epochs * self._steps_per_epoch,
            last_epoch=self.global_step - 1,
        )
        self._profiler = self._setup_profiler(cfg.get(stock.PROFILER_KEY, None))
        if self._resume_from_checkpoint:
            self._resume()

    def _claim_output_dir(self, cfg: DictConfig) -> None:
        """Lock ``output_dir`` for this run and record it (``run.json``), before anything is written there.

        Refuses a directory another run is writing (its lock) or, for a fresh run, one holding another run's
        checkpoints or training states unless ``overwrite_output_dir=True`` (see :func:`claim_output_dir`). A dry
        run of the set-up that writes nothing may override this with a no-op.

        Args:
            cfg (DictConfig): the parsed config.
        """
        self._run = claim_output_dir(cfg, self._layout())

    def _setup_model(
        self,
        cfg_model: DictConfig,
        enable_activation_checkpointing: bool,
        enable_activation_offloading: bool,
        fsdp_cpu_offload: bool,
        reshard_after_forward: bool,
        model_state_dict: Optional[Dict[str, Any]] = None,
        custom_sharded_layers: Optional[List[str]] = None,
        ac_mode: Optional[str] = None,
        ac_option: Optional[int] = None,
    ) -> nn.Module:
        """Build the model on the meta device, cut it into pipeline stages, then per part: layout, device, weights.

        Each part (a stage, or the whole model) gets the parallel layout of :func:`parallelize_model`, is
        materialised on the device (:func:`materialize`) and filled from the checkpoint (:meth:`_load_weights`).
        Sets ``self._model_parts`` (this rank's pipeline stages, or the whole model) and ``self._pipeline``.

        Returns:
            nn.Module: this rank's first model part (the whole model without pipeline parallelism).
        """
        init_start = time.perf_counter()
        utils.log_rank_zero(log, f"Precision: {self._precision.describe()}")
        with training.set_default_dtype(self._precision.master_dtype), torch.device("meta"):
            model = config.instantiate(cfg_model)
        self._precision.store_frozen_in_compute_dtype(model)  # no fp32 master for what does not train
        self._checkpointer.check_model_keys(model)  # on the whole model: a weight no stage reads is an error
        self._mesh = self._dims.build_mesh(self._device.type)
        set_mesh_timeout(self._mesh, self._distributed_timeout)
        if self._async_tp:  # before the blocks are compiled
            enable_async_tensor_parallel(self._mesh["tp"])
        self.dp_size = self._mesh["dp"].size()
        self.dp_rank = self._mesh["dp"].get_local_rank()

        # the layout, in its fixed order (FP8 -> TP -> tower split -> AC -> compile -> FSDP2)
        layout = dict(
            precision=self._precision, tp_plan=self.tensor_parallel_plan, tower_split=self._tower_split,
            activation_checkpointing=enable_activation_checkpointing, ac_mode=ac_mode, ac_option=ac_option,
            compile=self._compile, static_shapes=self._static_shapes, custom_sharded_layers=custom_sharded_layers,
            cpu_offload=fsdp_cpu_offload, reshard_after_forward=reshard_after_forward, verbose=self._is_rank_zero,
        )

        def parallelize(part: nn.Module) -> nn.Module:  # one pipeline stage, or the whole model
            parallelize_model(part, self._mesh, **layout)
            # torch 2.11's FSDP2 cannot reduce-scatter a trainable encoder's unused gradients: image-free batches hang
            self._image_free_batches_hang |= self._dims.dp_enabled and not hasattr(
                part, "set_reduce_scatter_unused_params"
            ) and any(p.requires_grad for n, p in part.named_parameters() if n.startswith("encoders."))
            materialize(part, self._device, rope_dtype=self._dtype)
            self._load_weights(part)
            training.validate_no_params_on_meta_device(part)
            return part

        self._pipeline = None
        if self._dims.pp_enabled:
            cfg = self._cfg
            split = cfg.get("pipeline_split", None)
            self._pipeline = build_pipeline(
                model,
                self._mesh["pp"],
                schedule=cfg.get("pipeline_schedule", "1F1B"),
                n_microbatches=int(cfg.get("pipeline_microbatches", None) or self._dims.pp),  # null: the degree
                loss_fn=self._step_loss,
                device=self._device,
                split=list(split) if split is not None else None,
                stages_per_rank=cfg.get("pipeline_stages_per_rank", None),
                parallelize_fn=parallelize,
                **cost_balanced_stage_extras(  # pipeline_split overrides it
                    model, tp=self._dims.tp, batch_size=cfg.batch_size,
                    microbatches=int(cfg.get("pipeline_microbatches", None) or self._dims.pp),
                    seq_len=cfg.tokenizer.max_seq_len, activation_checkpointing=self._enable_activation_checkpointing,
                    compile=cfg.get("compile", False), tower_split=self._tower_split,
                    packed=config_is_packed(cfg.dataset),
                ),
                # FSDP2 over one data-parallel rank: its reduce and reshard per micro-batch are local copies
                reduce_every_microbatch=self._dims.dp == 1,
            )
            self._model_parts = self._pipeline.model_parts
            self.activations_handling_ctx = contextlib.nullcontext()
            utils.log_rank_zero(
                log,
                f"Pipeline: {self._pipeline.num_stages} stages with {self._pipeline.layer_split} decoder layers, "
                f"schedule {cfg.get('pipeline_schedule', '1F1B')}, {self._pipeline.n_microbatches} micro-batches",
            )
        else:
            self._model_parts = [parallelize(model)]
            self.activations_handling_ctx = training.get_act_offloading_ctx_manager(
                model, enable_activation_offloading
            )
        total = sum(p.numel() for p in model.parameters())
        local = sum(p.numel() for part in self._model_parts for p in part.parameters())
        stages = self._pipeline.stage_ids if self._pipeline is not None else "all"
        log.info(
            f"Rank {self.rank} (pp/dp/tp coordinate {self._mesh.get_coordinate()}) holds stages {stages}: "
            f"{local:,} of the model's {total:,} parameters"
        )
        utils.log_rank_zero(
            log, f"Instantiating the model and loading its weights took {time.perf_counter() - init_start:.2f} s"
        )
        if self._is_rank_zero and self._device.type == "cuda":
            training.log_memory_stats(training.get_memory_stats(device=self._device))
        torch.distributed.barrier()
        return self._model_parts[0]

    def _load_weights(self, part: nn.Module) -> None:
        """Fill ``part`` (built, parallelised, empty) from the checkpoint; the LoRA recipe overrides this."""
        load_into_module(part, self._checkpointer.reader, dtype=self._precision.master_dtype)

    def _setup_data(
        self,
        cfg_dataset: DictConfig,
        shuffle: bool,
        batch_size: int,
        collate_fn: str,
        dataloader_state_dict: Optional[Dict[str, Any]] = None,
    ) -> StatefulDataLoader:
        """Like the stock method, but the sampler shards over the data-parallel ranks only; batches get their shape.

        Ranks of one tensor- or pipeline-parallel group must see the same batch. The collate pads to
        ``tokenizer.max_seq_len`` under pipeline parallelism and compiled TP (shaped once), else the longest sample
        rounded up to a multiple of the TP degree under sequence parallelism and of the loss's output chunks under
        ``compile`` (packs are ``max_seq_len`` long).

        Returns:
            StatefulDataLoader: the data loader.
        """
        if isinstance(cfg_dataset, ListConfig):
            ds = ConcatDataset([config.instantiate(c, self._tokenizer) for c in cfg_dataset])
        else:
            ds = config.instantiate(cfg_dataset, self._tokenizer)
        collate = collate_for_dataset(ds, _get_component_from_path(collate_fn))  # packs get the packed collate
        packed = collate is padded_collate_packed_mistral3  # max_seq_len long: one shape already
        # the batch's final shape, decided here once (the step pads nothing)
        collate = partial(collate, padding_idx=self._tokenizer.pad_id, ignore_idx=self._loss_fn.ignore_index)
        multiple = self._dims.tp if self._sequence_parallel else 1  # each TP rank holds s / tp tokens
        if self._compile and not packed:  # equal loss chunks: a chunk of one token would be another graph
            multiple = math.lcm(multiple, getattr(self._loss_fn, "num_output_chunks", 1))
        if self._dims.pp_enabled or self._static_shapes:  # pipeline stages, compiled TP blocks: shaped once
            collate = partial(collate, pad_to_length=self._tokenizer.max_seq_len)
        elif multiple > 1:
            collate = partial(collate, pad_to_multiple_of=multiple)
        sampler = StatefulDistributedSampler(ds, num_replicas=self.dp_size, rank=self.dp_rank, shuffle=shuffle)
        return StatefulDataLoader(
            dataset=IndexedDataset(ds),  # the batches carry their dataset rows, named when a step fails
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=IndexedCollate(collate),
            drop_last=True,
            # worker processes decode and resize the images while the GPU trains (num_workers, prefetch_factor)
            **loader_worker_options(self._cfg.get("num_workers", 0), self._cfg.get("prefetch_factor", None),
                                    self._device.type),
        )

    # ------------------------------------------------------------------ step

    def _shifted_labels(self, batch: Dict[str, Any]) -> torch.Tensor:
        """Pop the labels and align them with the logits (position t predicts token t + 1)."""
        labels = batch.pop("labels")
        return torch.hstack((labels[:, 1:], torch.full_like(labels[:, :1], self._loss_fn.ignore_index)))

    def _packed_mask(self, document_ids: torch.Tensor):
        """The block-causal mask of a packed batch, in the kernel's form that is faster for one micro-batch.

        FlexAttention's BlockMask, or a dense mask for SDPA where flex would leave the GPU idle (few packs per
        micro-batch and one KV head per TP rank, :func:`packed_attention_prefers_flex`).
        """
        n_micro = self._pipeline.n_microbatches if self._pipeline is not None else 1
        packs = max(document_ids.shape[0] // n_micro, 1)
        flex = packed_attention_prefers_flex(packs, self._kv_heads_per_rank, document_ids.shape[1])
        mask = block_causal_mask(document_ids, flex=flex)
        kind = "FlexAttention BlockMask" if isinstance(mask, BlockMask) else "SDPA with the dense mask"
        if kind != self._packed_kernel_logged and self._is_rank_zero:
            log.info(f"Packed attention: {kind} ({packs} pack(s) per micro-batch, "
                     f"{self._kv_heads_per_rank} KV head(s) per rank, {document_ids.shape[1]} tokens per pack)")
            self._packed_kernel_logged = kind
        return mask

    def _loss_share(self, batch: Dict[str, Any], num_tokens: torch.Tensor, forward_only: bool = False):
        """Forward (and backward) one micro-batch; return its summed cross-entropy divided by ``num_tokens``.

        ``num_tokens`` counts the label tokens of the whole global step, so the shares of all micro-batches
        and data-parallel ranks add up to the token-mean loss, and so do their gradients. Under pipeline
        parallelism the share lives on the last stage (None on other ranks).
        """
        if "document_ids" in batch:  # packed sequences: the block-causal mask, built on the device
            batch["mask"] = self._packed_mask(batch.pop("document_ids"))
        labels = self._shifted_labels(batch)  # the batch has its final shape (the collate's, see _setup_data)
        if self._pipeline is not None:
            with train_context(self._loss_parallel):
                return pipeline_step(self._pipeline, batch, labels, num_tokens, forward_only=forward_only)
        with train_context(self._loss_parallel):
            with self.activations_handling_ctx:
                logits = self._model(**batch)
            share = self._step_loss(logits, labels, num_tokens)
            del logits
            if not forward_only:
                share.backward()
        share = share.detach()
        # under loss parallel the loss is a replicated DTensor
        return share.full_tensor() if isinstance(share, DTensor) else share

    def _count_label_tokens(self, batches: List[Dict[str, Any]]) -> torch.Tensor:
        """Label tokens (after the shift) of ``batches``, summed over data-parallel ranks."""
        n = sum((b["labels"][:, 1:] != self._loss_fn.ignore_index).sum() for b in batches)
        n = torch.as_tensor(n, device=self._device)
        torch.distributed.all_reduce(n, group=self._mesh["dp"].get_group())
        return n

    def _reduce_loss(self, local: torch.Tensor) -> float:
        """Sum a loss share over data-parallel replicas and pipeline stages (non-last stages hold 0)."""
        torch.distributed.all_reduce(local, group=self._mesh["dp"].get_group())
        if self._pipeline is not None:
            torch.distributed.all_reduce(local, group=self._mesh["pp"].get_group())
        return local.item()

    def _check_images_on_old_fsdp(self, batches: List[Dict[str, Any]]) -> None:
        """Refuse a micro-batch without images where this torch's FSDP2 would hang on the encoder's gradients.

        Where FSDP2 has no ``set_reduce_scatter_unused_params`` (torch 2.11; 2.13 has it), it reduce-scatters only
        the parameters that received a gradient, so a data-parallel replica whose micro-batch has no image would
        leave the trainable projector (or tower) out of a collective the other replicas join.
        """
        if not self._image_free_batches_hang:
            return
        for b in batches:
            image = (b.get("encoder_input") or {}).get("image") or {}
            count = image.get("images_per_sample")
            if count is None or int(count.sum()) == 0:
                raise RuntimeError(
                    f"dp rank {self.dp_rank}: a micro-batch without images (dataset rows {self._step_rows}) with a "
                    f"trainable image encoder under FSDP2 on torch {torch.__version__}, which cannot reduce-scatter "
                    "the encoder's unused gradients (it has no set_reduce_scatter_unused_params; torch 2.13 has): the "
                    "other replicas would hang. Upgrade torch, drop image-free rows from the dataset, or freeze the "
                    "encoder (model.projector_trainable=False, model.vision_trainable=False)."
                )

    def _train_step(self, batches: List[Dict[str, Any]]) -> Dict[str, float]:
        """One optimizer step over ``batches`` (the gradient-accumulation micro-batches of this rank).

        Returns:
            Dict[str, float]: loss (token mean over the global batch), grad norm (if clipping), token counts.
        """
        for b in batches:
            utils.batch_to_device(b, self._device)
        self._check_images_on_old_fsdp(batches)
        num_tokens = self._count_label_tokens(batches).clamp(min=1)
        out = count_step_data(batches, len(self._step_rows), self._tokenizer.pad_id, self._mesh["dp"].get_group())
        loss = torch.zeros((), device=self._device)
        for b in batches:
            share = self._loss_share(b, num_tokens)
            if share is not None:
                loss += share
        out.update(loss=self._reduce_loss(loss), label_tokens=int(num_tokens))
        if self._tower_split:  # each TP rank's encoder gradients cover its share of the images: add them up
            sum_split_encoder_grads(self._model_parts)
        trainable = [p for part in self._model_parts for p in part.parameters() if p.requires_grad]
        if self._clip_grad_norm is not None:
            out["grad_norm"] = float(
                clip_grad_norm_(
                    trainable,
                    max_norm=float(self._clip_grad_norm),
                    pp_group=self._mesh["pp"].get_group() if self._pipeline is not None else None,
                )
            )
        self._optimizer_step(out, trainable)
        return out

    def _optimizer_step(self, out: Dict[str, float], trainable: List[nn.Parameter]) -> None:
        """Apply the step unless its loss or gradients are not finite (then skip or stop); advance the LR.

        Records in ``out["lr"]`` the learning rate this step used (read before the scheduler moves on).
        """
        step = self.global_step + 1
        grad_norm = out.get("grad_norm", None)
        rows = self._step_rows
        if self._nonfinite.step_is_finite(
            step=step, loss=out["loss"], grad_norm=grad_norm, parameters=trainable, rows=rows, device=self._device
        ):
            self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        out["lr"] = training.get_lr(self._optimizer)
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()

    @torch.no_grad()
    def _validate(self) -> float:
        """Token-mean loss over the validation data (at most ``max_val_steps`` batches per rank)."""
        for part in self._model_parts:
            part.eval()
        loss_sum = torch.zeros((), device=self._device)
        tokens = torch.zeros((), device=self._device, dtype=torch.long)
        for i, batch in enumerate(self._val_dataloader):
            if self._max_val_steps is not None and i >= self._max_val_steps:
                break
            pop_sample_indices(batch)
            utils.batch_to_device(batch, self._device)
            n = self._count_label_tokens([batch])
            share = self._loss_share(batch, n.clamp(min=1), forward_only=True)
            if share is not None:
                loss_sum += share * n
            tokens += n
        for part in self._model_parts:
            part.train()
        return self._reduce_loss(loss_sum) / max(int(tokens), 1)

    def _batches(self, epoch: int) -> Iterator[List[Dict[str, Any]]]:
        """Group the epoch's batches into optimizer steps of ``gradient_accumulation_steps`` micro-batches.

        Sets ``self._data_wait_s``: the seconds this step's micro-batches kept the training process waiting on
        the data loader (with workers, only what they had not prepared in time).
        """
        self._dataloader.sampler.set_epoch(epoch)
        step: List[Dict[str, Any]] = []
        rows: List[int] = []
        wait = 0.0
        start = time.perf_counter()
        # the iterator draws its workers' base seed from torch's RNG: a resumed run creates one where the straight
        # run did not, so the draw must not move the RNG that dropout and the rest of the step use
        rng = torch.get_rng_state()
        batches = iter(self._dataloader)
        torch.set_rng_state(rng)
        for batch in batches:  # the first wait includes starting the workers
            wait += time.perf_counter() - start
            rows += pop_sample_indices(batch)
            step.append(batch)
            if len(step) == self._gradient_accumulation_steps:
                self._step_rows, self._data_wait_s = rows, wait
                yield step
                step, rows, wait = [], [], 0.0
            start = time.perf_counter()

    def _layout(self) -> Dict[str, int]:
        return {"world_size": self.world_size, "pp": self._dims.pp, "dp": self._dims.dp, "tp": self._dims.tp}

    def save_checkpoint(self, epoch: int, final: bool) -> None:
        """Write the HF checkpoint (portable weights) and this rank's training state (exact resume).

        Args:
            epoch (int): current epoch, for the directory name.
            final (bool): whether this is the end-of-training checkpoint.
        """
        check_finite_for_save(self._model_parts, self._optimizer, self._device)
        self._last_saved_step = self.global_step
        parts = self._model_parts if self._pipeline is not None else self._model
        path = self._checkpointer.save_distributed(parts, epoch, mesh=self._mesh, pp_dim="pp")
        epoch_done = self.global_step >= (epoch + 1) * self._steps_per_epoch
        epochs_run = epoch + 1 if epoch_done else epoch
        state = save_training_state(
            self._output_dir,
            self.global_step,
            layout=self._layout(),
            model_parts=self._model_parts,
            optimizer=self._optimizer,
            extra={
                "global_step": self.global_step,
                "epochs_run": epochs_run,
                "dataloader": None if epoch_done else self._dataloader.state_dict(),
                "lr_scheduler": self._lr_scheduler.state_dict() if self._lr_scheduler is not None else None,
            },
            run_record=self._run_record(epochs_run) if self._run is not None else None,
            replace_other_runs=self._run is not None and self._run.replacing,
        )
        if self._run is not None and self._run.replacing:  # overwrite_output_dir: this run's first save is complete
            self._run.delete_replaced_checkpoints(keep=path)
        kind = "final" if final else "intermediate"
        utils.log_rank_zero(
            log, f"Saved the {kind} checkpoint (step {self.global_step}) to {path}, training state to {state}"
        )

    def _run_record(self, epochs_run: int) -> Dict[str, Any]:
        """What a training state records of this run, compared on resume (:func:`check_resumable`)."""
        run_id = self._run.run_id if self._run is not None else None
        return run_record(self._cfg, self._layout(), run_id=run_id, dataloader=self._dataloader,
                          steps_per_epoch=self._steps_per_epoch, epochs_run=epochs_run)

    def _resume(self) -> None:
        """Continue from the newest training state in ``output_dir`` (``resume_from_checkpoint: True``)."""
        # the newest training state every rank can read (a damaged one is skipped with a warning), if this run
        # continues it exactly: same sample order, schedule and update (else refused, naming every key)
        now = self._run_record(epochs_run=self.epochs_run)
        directory, extra = load_training_state(
            self._output_dir, layout=self._layout(), model_parts=self._model_parts, optimizer=self._optimizer,
            check=partial(check_resumable, now=now),
        )
        if self._run is not None:
            self._run.continue_run(directory)
        self.global_step, self.epochs_run = extra["global_step"], extra["epochs_run"]
        if extra["dataloader"] is not None:
            self._dataloader.load_state_dict(extra["dataloader"])
        if self._lr_scheduler is not None and extra["lr_scheduler"] is not None:
            self._lr_scheduler.load_state_dict(extra["lr_scheduler"])
        utils.log_rank_zero(log, f"Resumed from {directory}: step {self.global_step}, epoch {self.epochs_run + 1}")

    def train(self) -> None:
        """Run the training loop: steps, logging, validation and checkpoints."""
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        self._optimizer.zero_grad(set_to_none=True)
        self._profiler.start()
        for epoch in range(self.epochs_run, self.total_epochs):
            done = self.global_step - epoch * self._steps_per_epoch
            pbar = tqdm(total=self._steps_per_epoch, initial=done, disable=not self._is_rank_zero, dynamic_ncols=True)
            t0 = time.perf_counter()
            for batches in self._batches(epoch):
                if done >= self._steps_per_epoch:
                    break
                metrics = self._train_step(batches)
                self.global_step += 1
                done += 1
                elapsed = time.perf_counter() - t0
                metrics["tokens_per_second_per_gpu"] = metrics["input_tokens"] / (elapsed * self.world_size)
                # wall time of the step (data wait included), the part spent waiting on the data loader, graphs
                # compiled so far (a rise after the first steps is a recompile) and when the step ended
                metrics.update(step_time_s=elapsed, data_wait_s=self._data_wait_s,
                               compiled_graphs=compiled_graph_count(), unix_time_s=time.time())
                if self._run_val_every_n_steps and self._val_dataloader is not None:
                    if self.global_step % self._run_val_every_n_steps == 0:
                        metrics["val_loss"] = self._validate()
                self._log_step(pbar, epoch, metrics)
                self._profiler.step()
                if self._save_every_n_steps and self.global_step % self._save_every_n_steps == 0:
                    self.save_checkpoint(epoch, final=False)
                t0 = time.perf_counter()
            pbar.close()
            self.epochs_run += 1
        self._profiler.stop()
        if self._last_saved_step != self.global_step:
            self.save_checkpoint(self.epochs_run - 1, final=True)

    def _log_step(self, pbar: tqdm, epoch: int, metrics: Dict[str, float]) -> None:
        if not self._is_rank_zero:
            return
        pbar.update(1)
        postfix = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}"}
        if "grad_norm" in metrics:
            postfix["gnorm"] = f"{metrics['grad_norm']:.3f}"
        postfix["tok/s/gpu"] = f"{metrics['tokens_per_second_per_gpu']:.0f}"
        if "val_loss" in metrics:
            postfix["val"] = f"{metrics['val_loss']:.4f}"
        pbar.set_description(f"epoch {epoch + 1}|step {self.global_step}")
        pbar.set_postfix(postfix)
        if self.global_step % self._log_every_n_steps == 0 or "val_loss" in metrics:
            logged = {k: v for k, v in metrics.items() if k not in ("input_tokens", "label_tokens")}
            logged["real_tokens"] = metrics["input_tokens"]
            if self._log_peak_memory_stats:
                logged.update(training.get_memory_stats(device=self._device))
            self._metric_logger.log_dict(logged, step=self.global_step)
