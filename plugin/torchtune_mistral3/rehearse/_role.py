"""Play one rank of a job: the recipe's own ``__init__``, ``setup`` and one ``_train_step``, then the save plan.

The recipe class is the one ``tune run`` would run (:class:`Mistral3FullFinetuneRecipe` or its LoRA subclass),
subclassed here only where a rehearsal must differ: weights are planned reads (:class:`PlannedReader`), the
metric logger and the output directory are left alone, and the data loader is built outside the memory count
(its host-side tensors are not GPU memory).
"""

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.tensor import DTensor

from torchtune_mistral3.rehearse._fake import Phase, RehearsalMode, StageMetaMailbox, fake_runtime, patched
from torchtune_mistral3.rehearse._preflight import check_tokenizer_matches_config
from torchtune_mistral3.rehearse._reads import PlannedRead, PlannedReader


@dataclass
class SavePlan:
    """What a rank's save does: its pipeline stage, whether it writes that stage's files, and their contents.

    Attributes:
        stage (int): the pipeline coordinate whose files these are.
        writer (bool): whether this rank writes them (coordinate 0 on every other mesh dimension).
        files (List[List[str]]): per file, the plugin keys it holds, in save order.
        nbytes (int): bytes of those files' tensors.
        names (Optional[List[str]]): the files' names when fixed (a PEFT adapter); None for HF shards, numbered
            over all stages.
    """

    stage: int
    writer: bool
    files: List[List[str]]
    nbytes: int
    names: Optional[List[str]] = None


@dataclass
class RoleReport:
    """What one rank did in the rehearsal.

    Attributes:
        rank (int): global rank.
        coordinate (Dict[str, int]): its (pp, dp, tp) coordinate.
        stages (List[int]): pipeline stages it holds (``[0]`` without pipeline parallelism).
        layers (List[Tuple[int, int]]): per stage, the decoder layers ``[start, end)``.
        param_count (int): elements of the parameters of its model parts (global shapes).
        local_numel (int): elements it holds.
        local_bytes (int): bytes it holds (parameters).
        trainable_local_numel (int): elements of trainable parameters it holds.
        placements (Dict[str, int]): placement description -> number of parameters.
        phases (Dict[str, Phase]): peak memory and collectives of ``setup``, ``step`` and ``save``.
        reads (List[PlannedRead]): checkpoint blocks it would read.
        save (Optional[SavePlan]): its part of the save.
        values_read (int): values read back from fake tensors (they read as 1).
        step_metrics (Dict[str, Any]): what ``_train_step`` returned (no real values).
        schedule (List[str]): the pipeline schedule and each stage's inferred input and output shapes.
    """

    rank: int
    coordinate: Dict[str, int]
    stages: List[int]
    layers: List[Tuple[int, int]]
    param_count: int = 0
    local_numel: int = 0
    local_bytes: int = 0
    trainable_local_numel: int = 0
    placements: Dict[str, int] = field(default_factory=dict)
    phases: Dict[str, Phase] = field(default_factory=dict)
    reads: List[PlannedRead] = field(default_factory=list)
    save: Optional[SavePlan] = None
    values_read: int = 0
    step_metrics: Dict[str, Any] = field(default_factory=dict)
    schedule: List[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        """int: the largest live memory of any phase (the save's gathers included): what must fit the GPU."""
        return max((p.peak_bytes for p in self.phases.values()), default=0)

    @property
    def train_peak_bytes(self) -> int:
        """int: the largest live memory of setup and the step: what the memory planner models."""
        return max((p.peak_bytes for k, p in self.phases.items() if k != "save"), default=0)


def rehearsal_recipe_class(base: type) -> type:
    """Subclass the recipe ``base`` for a rehearsal (see the module docstring).

    Args:
        base (type): ``Mistral3FullFinetuneRecipe`` or a subclass.

    Returns:
        type: the rehearsal recipe; :func:`play_rank` sets its ``_rehearsal_mode`` before building it.
    """

    class RehearsalRecipe(base):
        _rehearsal_mode: Optional[RehearsalMode] = None
        _planned: Optional[PlannedReader] = None

        def _load_weights(self, part: nn.Module) -> None:
            checkpointer = self._checkpointer
            if self._planned is None:
                self._planned = PlannedReader(checkpointer.reader, self.rank)
            from torchtune_mistral3.checkpointing import _load

            # a planned read has no values: its NaN count would read as 1 (every fake value does)
            with patched(checkpointer, "_reader", self._planned), patched(_load, "_non_finite", lambda value: 0):
                super()._load_weights(part)

        def setup(self, cfg: DictConfig) -> None:
            super().setup(cfg)
            check_tokenizer_matches_config(self._tokenizer, cfg.checkpointer.checkpoint_dir)

        def _claim_output_dir(self, *args: Any, **kwargs: Any) -> None:  # a rehearsal writes nothing
            return None

        def _setup_data(self, *args: Any, **kwargs: Any):
            mode = self._rehearsal_mode
            with mode.untracked() if mode is not None else contextlib.nullcontext():
                return super()._setup_data(*args, **kwargs)

    RehearsalRecipe.__name__ = RehearsalRecipe.__qualname__ = f"Rehearsal{base.__name__}"
    return RehearsalRecipe


def _placement(p: torch.Tensor) -> str:
    if not isinstance(p, DTensor):
        return "replicated (plain tensor)"
    names = p.device_mesh.mesh_dim_names or tuple(str(i) for i in range(p.device_mesh.ndim))
    return ", ".join(f"{n}: {pl}" for n, pl in zip(names, p.placements))


def describe_parameters(report: RoleReport, parts: List[nn.Module]) -> None:
    """Fill the parameter fields of ``report`` from this rank's model parts.

    Args:
        report (RoleReport): the report to fill.
        parts (List[nn.Module]): the rank's model parts.
    """
    placements: Dict[str, int] = {}
    for part in parts:
        for _, p in part.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            report.param_count += p.numel()
            report.local_numel += local.numel()
            report.local_bytes += local.numel() * local.element_size()
            if p.requires_grad:
                report.trainable_local_numel += local.numel()
            key = f"{_placement(p)} [{p.dtype}]".replace("torch.", "")
            placements[key] = placements.get(key, 0) + 1
    report.placements = dict(sorted(placements.items(), key=lambda kv: -kv[1]))


def plan_save(recipe: Any) -> SavePlan:
    """Rehearse the recipe's save up to its file plan: the per-tensor gathers run, nothing is converted or written.

    Mirrors ``checkpointing._writer.save_distributed`` (called by ``Mistral3HFCheckpointer.save_distributed``): the
    rank's stage state dict, its shard plan, and one ``full_tensor()`` per DTensor (the collectives the save
    issues, and the memory of the largest gathered tensor).

    Args:
        recipe (Any): a set-up recipe.

    Returns:
        SavePlan: this rank's stage, writer role and files.
    """
    from torchtune_mistral3.checkpointing._writer import ShardPlan, _HFTensorConverter, _stage_role

    checkpointer = recipe._checkpointer
    inner = getattr(checkpointer, "_checkpointer", checkpointer)  # the LoRA recipe wraps the checkpointer
    options = inner._fp8_options(inner.reader.keys()) if hasattr(inner, "_fp8_options") else {}
    converter = _HFTensorConverter(getattr(inner, "_save_dtype", torch.bfloat16), options.get("fp8_keys") or (),
                                   None)
    state: Dict[str, torch.Tensor] = {}
    for part in recipe._model_parts:
        for key, value in part.state_dict().items():
            state.setdefault(key, value)
    if checkpointer is not inner:  # LoRA (LoRAAdapterSaver): rank 0 writes the PEFT adapter, gathered per tensor
        from torchtune_mistral3.checkpointing import adapter_keys

        keep = set(adapter_keys(recipe._model))
        state = {k: v for k, v in state.items() if k in keep}
        for value in state.values():
            full = value.full_tensor() if isinstance(value, DTensor) else value
            del full
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        return SavePlan(0, recipe.rank == 0, [list(state)], nbytes, names=["adapter/adapter_model.safetensors"])
    plan = ShardPlan([(k, converter.nbytes(k, v.shape, v.dtype)) for k, v in state.items()],
                     getattr(inner, "_max_shard_bytes", 5 * 1024**3))
    stage, writer = _stage_role(recipe._mesh, "pp", recipe.rank)
    for value in state.values():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        del full
    return SavePlan(stage, writer, plan.files, plan.nbytes)


@contextlib.contextmanager
def rank_environment(rank: int, world_size: int, local_world_size: int) -> Iterator[None]:
    """The torchrun environment of ``rank`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_*``), restored afterwards."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank % local_world_size),
        LOCAL_WORLD_SIZE=str(local_world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT="29500",
        GROUP_RANK=str(rank // local_world_size),
    )
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def play_rank(
    recipe_cls: type, stock_module: Any, cfg: DictConfig, rank: int, world_size: int, mailbox: StageMetaMailbox,
    local_world_size: int = 8,
    setup_only: bool = False,
) -> RoleReport:
    """Play ``rank`` of ``world_size``: setup, one optimizer step, the save plan; on fake tensors and the fake backend.

    Args:
        recipe_cls (type): the rehearsal recipe (:func:`rehearsal_recipe_class`).
        stock_module (Any): the stock torchtune recipe module whose ``init_process_group`` the recipe calls.
        cfg (DictConfig): the rehearsal config (device cpu, compile off, local data; see ``_config.py``).
        rank (int): the rank to play.
        world_size (int): the job's world size.
        mailbox (StageMetaMailbox): pipeline metadata shared by the ranks played in this process.
        local_world_size (int): processes per node. Default is 8.
        setup_only (bool): stop after ``setup`` (a pre-flight of the checkpoint: reads planned and checked).
            Default is False.

    Returns:
        RoleReport: what the rank did.
    """
    from torchtune_mistral3.rehearse._fake import init_fake_process_group

    with rank_environment(rank, world_size, min(local_world_size, world_size)):
        init_fake_process_group(rank, world_size)
        try:
            with patched(stock_module, "init_process_group", lambda *a, **k: None), mailbox.installed(), \
                    fake_runtime("cpu") as mode:
                recipe_cls._rehearsal_mode = mode
                with mode.phase("setup"):
                    recipe = recipe_cls(cfg=cfg)
                    recipe.setup(cfg=cfg)
                    if not setup_only:
                        allocate_optimizer_state(recipe._optimizer)
                report = _describe(recipe)
                if not setup_only:
                    with mode.phase("step"):
                        batches = next(iter(recipe._batches(0)))
                        report.step_metrics = recipe._train_step(batches)
                        del batches
                    report.schedule = _schedule_shapes(recipe)
                    with mode.phase("save"):
                        report.save = plan_save(recipe)
                report.phases = dict(mode.phases)
                report.values_read = mode.values_read
                report.reads = list(recipe._planned.reads) if recipe._planned is not None else []
                del recipe
        finally:
            recipe_cls._rehearsal_mode = None
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    return report


def allocate_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give ``optimizer`` its states (Adam's moments) as every step after the first has them.

    Adam allocates its states in the first ``step()``, after that step's forward and backward: a rehearsal of the
    first step would miss them at the activation peak. One step over zero gradients (fake tensors) allocates them.

    Args:
        optimizer (torch.optim.Optimizer): the recipe's optimizer.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _describe(recipe: Any) -> RoleReport:
    coordinate = dict(zip(recipe._mesh.mesh_dim_names, recipe._mesh.get_coordinate()))
    pipeline = recipe._pipeline
    if pipeline is not None:
        bounds = [sum(pipeline.layer_split[:i]) for i in range(len(pipeline.layer_split) + 1)]
        stages = list(pipeline.stage_ids)
        layers = [(bounds[s], bounds[s + 1]) for s in stages]
    else:
        n = len(recipe._model.decoder.layers)
        stages, layers = [0], [(0, n)]
    report = RoleReport(rank=recipe.rank, coordinate=coordinate, stages=stages, layers=layers)
    describe_parameters(report, recipe._model_parts)
    return report


def _shapes(metas: Any) -> str:
    return ", ".join(f"{list(m.shape)} {str(m.dtype).replace('torch.', '')}" for m in metas or () if m is not None)


def _schedule_shapes(recipe: Any) -> List[str]:
    """The schedule, its micro-batches and each stage's input/output shapes as torch inferred them at the step."""
    pipeline = recipe._pipeline
    if pipeline is None:
        return []
    schedule = pipeline.schedule
    stages = getattr(schedule, "_stages", None) or [schedule._stage]
    lines = [f"{type(schedule).__name__}, {pipeline.n_microbatches} micro-batches of the batch "
             f"{list(getattr(pipeline, '_batch_shape', ()))}"]
    for stage in stages:
        meta = stage._stage_meta
        lines.append(f"stage {stage.stage_index}: in {_shapes(meta.inputs) or '-'} -> out {_shapes(meta.outputs)}")
    return lines
