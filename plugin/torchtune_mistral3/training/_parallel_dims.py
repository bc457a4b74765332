"""Parallel degrees (pipeline x data x tensor), the 3-D device mesh, and the pipeline schedule, validated once."""

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional

from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping
from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    ScheduleDualPipeV,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
    get_schedule_class,
)
from torchtune.modules import MultiHeadAttention
from torchtune.modules.model_fusion import DeepFusionModel, EarlyFusionModel


class WorldSizeError(ValueError):
    """The world size is not a multiple of ``pipeline_parallel_dim x tensor_parallel_dim`` (callers word the fix).

    Args:
        world_size (int): number of processes.
        pp (int): pipeline parallel degree.
        tp (int): tensor parallel degree.
    """

    def __init__(self, world_size: int, pp: int, tp: int) -> None:
        self.world_size, self.pp, self.tp = world_size, pp, tp
        super().__init__(
            f"World size {world_size} is not divisible by pipeline_parallel_dim ({pp}) x "
            f"tensor_parallel_dim ({tp}) = {pp * tp}. Launch a multiple of "
            f"{pp * tp} processes or change pipeline_parallel_dim / tensor_parallel_dim."
        )


@dataclass(frozen=True)
class ParallelDims:
    """Pipeline, data and tensor parallel degrees of one job: the one check of the degrees and the world size.

    Data parallelism (FSDP2) takes what is left of the world size: ``dp = world_size // (pp * tp)``.
    The mesh dims are ordered ``("pp", "dp", "tp")`` so that the tensor parallel group (most
    communication) is made of neighbouring ranks, i.e. of GPUs of one host.

    Args:
        world_size (int): number of processes.
        pp (int): pipeline parallel degree, config key ``pipeline_parallel_dim``. Default is 1.
        tp (int): tensor parallel degree, config key ``tensor_parallel_dim``. Default is 1.

    Raises:
        ValueError: if a degree is below 1.
        WorldSizeError: if ``pp * tp`` does not divide ``world_size``.
    """

    world_size: int
    pp: int = 1
    tp: int = 1

    def __post_init__(self):
        for key, value in (("pipeline_parallel_dim", self.pp), ("tensor_parallel_dim", self.tp)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}.")
        if self.world_size % (self.pp * self.tp) != 0:
            raise WorldSizeError(self.world_size, self.pp, self.tp)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], world_size: Optional[int] = None) -> "ParallelDims":
        """The layout of a config: the one place ``pipeline_parallel_dim`` and ``tensor_parallel_dim`` are read.

        Args:
            cfg (Mapping[str, Any]): the config (a ``DictConfig`` or a dict); both keys default to 1.
            world_size (Optional[int]): number of processes; None for the fewest that hold the layout
                (``pp x tp``, data parallel 1). Default is None.

        Returns:
            ParallelDims: the checked layout.

        Raises:
            ValueError: if a degree is below 1.
            WorldSizeError: if ``pp * tp`` does not divide ``world_size``.
        """
        pp = int(cfg.get("pipeline_parallel_dim", 1))
        tp = int(cfg.get("tensor_parallel_dim", 1))
        return cls(pp * tp if world_size is None else world_size, pp=pp, tp=tp)

    @property
    def dp(self) -> int:
        """int: data parallel (FSDP) degree, the rest of the world size."""
        return self.world_size // (self.pp * self.tp)

    @property
    def pp_enabled(self) -> bool:
        """bool: whether the model is split into pipeline stages."""
        return self.pp > 1

    @property
    def tp_enabled(self) -> bool:
        """bool: whether layers are tensor parallel."""
        return self.tp > 1

    @property
    def dp_enabled(self) -> bool:
        """bool: whether parameters are sharded with FSDP2."""
        return self.dp > 1

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Build the ``("pp", "dp", "tp")`` device mesh (size-1 dims included, so every sub-mesh exists).

        Args:
            device_type (str): ``"cuda"`` or ``"cpu"``.

        Returns:
            DeviceMesh: the 3-D mesh; use ``mesh["pp"]``, ``mesh["dp"]``, ``mesh["tp"]``.
        """
        return init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp"))


def validate_tensor_parallel(model: nn.Module, tp: int) -> None:
    """Check that every decoder attention module can be split ``tp`` ways.

    Only the decoder is checked: the vision tower and projector stay replicated.

    Args:
        model (nn.Module): a ``TransformerDecoder`` or a fusion model with a ``decoder``.
        tp (int): tensor parallel degree.

    Raises:
        ValueError: naming the module, its head counts and the divisors that would work.
    """
    if tp == 1:
        return
    decoder = model.decoder if isinstance(model, (EarlyFusionModel, DeepFusionModel)) else model
    for name, module in decoder.named_modules():
        if not isinstance(module, MultiHeadAttention):
            continue
        counts = {"num_heads": module.num_heads, "num_kv_heads": module.num_kv_heads, "embed_dim": module.embed_dim}
        bad = {k: v for k, v in counts.items() if v % tp != 0}
        if bad:
            common = counts["num_kv_heads"]
            divisors = [d for d in range(1, common + 1) if all(v % d == 0 for v in counts.values())]
            raise ValueError(
                f"tensor_parallel_dim={tp} does not divide {', '.join(f'{k}={v}' for k, v in bad.items())} of "
                f"decoder.{name}. Set tensor_parallel_dim to one of {divisors}."
            )


def validate_pipeline_stages(num_layers: int, num_stages: int) -> None:
    """Check that every pipeline stage can get at least one decoder layer.

    Args:
        num_layers (int): decoder layers of the model.
        num_stages (int): ``pipeline_parallel_dim`` x stages per rank.

    Raises:
        ValueError: if there are more stages than layers.
    """
    if num_stages > num_layers:
        raise ValueError(
            f"{num_stages} pipeline stages for a decoder of {num_layers} layers: every stage needs at least "
            f"one layer. Lower pipeline_parallel_dim (or the stages per rank of the schedule)."
        )


# Schedules that place their stages in a "v" (rank 0 holds the first and the last stage).
_V_SCHEDULES = (ScheduleZBVZeroBubble, ScheduleDualPipeV)
# Schedules whose rounds need n_microbatches % max(1, n_microbatches // pp) == 0.
_ROUND_SCHEDULES = (ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble, ScheduleLoopedBFS)


def get_pipeline_schedule_class(name: str) -> type:
    """Map a ``pipeline_schedule`` config value to a torch schedule class (case-insensitive).

    Args:
        name (str): one of ``1F1B``, ``GPipe``, ``Interleaved1F1B``, ``LoopedBFS``,
            ``InterleavedZeroBubble``, ``ZBVZeroBubble``, ``DualPipeV``.

    Returns:
        type: the schedule class.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    try:
        cls = get_schedule_class(name)
    except ValueError as e:
        raise ValueError(f"pipeline_schedule={name!r} is not a torch pipeline schedule: {e}") from None
    if cls.__name__ in ("PipelineScheduleSingle", "PipelineScheduleMulti"):
        raise ValueError(f"pipeline_schedule={name!r} is an abstract base; pick a concrete schedule.")
    return cls


def default_stages_per_rank(schedule_cls: type) -> int:
    """Stages per pipeline rank a schedule is built for: 1 for single-stage schedules, else 2.

    Args:
        schedule_cls (type): a torch schedule class.

    Returns:
        int: number of (virtual) stages each pipeline rank holds.
    """
    return 1 if issubclass(schedule_cls, PipelineScheduleSingle) else 2


def stage_ids_for_rank(schedule_cls: type, pp_rank: int, pp_size: int, stages_per_rank: int) -> List[int]:
    """Global stage indices held by one pipeline rank ("loop" placement, or "v" for ZBV / DualPipeV).

    Args:
        schedule_cls (type): a torch schedule class.
        pp_rank (int): rank in the pipeline group.
        pp_size (int): pipeline parallel degree.
        stages_per_rank (int): stages each rank holds.

    Returns:
        List[int]: the stage indices, ascending.
    """
    num_stages = pp_size * stages_per_rank
    style = "v" if issubclass(schedule_cls, _V_SCHEDULES) else "loop"
    mapping = generate_stage_to_rank_mapping(pp_size, num_stages, style=style)
    return sorted(s for s, r in mapping.items() if r == pp_rank)


def validate_pipeline_schedule(
    schedule_cls: type, n_microbatches: int, pp_size: int, stages_per_rank: int, batch_size: Optional[int] = None
) -> None:
    """Check the microbatch count and stages per rank against the schedule's constraints.

    Args:
        schedule_cls (type): a torch schedule class.
        n_microbatches (int): config key ``pipeline_microbatches``.
        pp_size (int): config key ``pipeline_parallel_dim``.
        stages_per_rank (int): stages each pipeline rank holds.
        batch_size (Optional[int]): per data-parallel-replica batch size, checked for divisibility. Default is None.

    Raises:
        ValueError: naming the constraint and the config key to change.
    """
    name = schedule_cls.__name__
    num_stages = pp_size * stages_per_rank
    if n_microbatches < 1:
        raise ValueError(f"pipeline_microbatches must be >= 1, got {n_microbatches}.")
    if issubclass(schedule_cls, PipelineScheduleSingle) and stages_per_rank != 1:
        raise ValueError(f"{name} runs one stage per rank; got {stages_per_rank}. Use an interleaved schedule.")
    if issubclass(schedule_cls, _V_SCHEDULES) and stages_per_rank != 2:
        raise ValueError(f"{name} needs exactly 2 stages per rank; got {stages_per_rank}.")
    if name == "Schedule1F1B" and n_microbatches < num_stages:
        raise ValueError(
            f"1F1B needs pipeline_microbatches >= pipeline stages ({num_stages}); got {n_microbatches}."
        )
    if issubclass(schedule_cls, ScheduleDualPipeV) and n_microbatches < num_stages:
        raise ValueError(
            f"DualPipeV needs pipeline_microbatches >= pipeline stages ({num_stages}); got {n_microbatches}."
        )
    if issubclass(schedule_cls, _ROUND_SCHEDULES):
        rounds = max(1, n_microbatches // pp_size)
        if n_microbatches % rounds != 0:
            raise ValueError(
                f"{name} needs pipeline_microbatches to be a multiple of max(1, pipeline_microbatches // "
                f"pipeline_parallel_dim) = {rounds}; got {n_microbatches}. Use a multiple of {pp_size}."
            )
    if batch_size is not None and batch_size % n_microbatches != 0:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by pipeline_microbatches={n_microbatches}: every "
            "microbatch must have the same shape. Change one of them."
        )
