"""Pipeline parallelism for torchtune ``EarlyFusionModel`` s with ``torch.distributed.pipelining``.

A stage is a deep copy of the full model (built on the meta device) in which everything the stage does
not own is replaced by a parameter-free stand-in, so stock torchtune modules run unchanged and every
parameter keeps its full-model FQN (``decoder.layers.<global index>.*``): loading and saving use the
same keys as without pipelining.

- stage 0 owns ``tok_embeddings``, the encoders (vision tower + projector) and the first layers;
- the last stage owns ``decoder.norm`` and ``decoder.output``;
- the images of a batch travel through the schedule as an opaque :class:`StageImages` holder (replicated
  to every microbatch) plus a ``sample_idx`` tensor (split with the batch), so images of different
  sizes and 0..n images per sample never get cut by the microbatch splitter;
- the loss is ``sum-CE / num_tokens`` per microbatch with ``num_tokens`` the valid labels of the whole
  global batch, handed in through ``loss_kwargs`` with ``scale_grads=False``: the sum over microbatches
  equals the unsplit loss.

Order of construction (what the recipe does): model on meta -> :func:`build_pipeline` which cuts the
stages and applies ``parallelize_fn`` to each (:func:`~torchtune_mistral3.training.parallelize_model`'s layout,
then materialisation and the weight load) -> ``PipelineStage`` s -> schedule.
"""

import copy
import math
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining._backward import stage_backward
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, _PipelineSchedule
from torch.distributed.tensor import DTensor
from torchtune.modules import TiedLinear
from torchtune.modules.model_fusion import EarlyFusionModel

from ._parallel_dims import (
    _V_SCHEDULES,
    default_stages_per_rank,
    get_pipeline_schedule_class,
    stage_ids_for_rank,
    validate_pipeline_schedule,
    validate_pipeline_stages,
)


def balanced_layer_split(
    num_layers: int, num_stages: int, first_stage_extra: float = 1.0, last_stage_extra: float = 1.0
) -> List[int]:
    """Decoder layers per stage so that every stage carries about the same cost.

    Rule: stage 0 also carries the embeddings and encoders, worth ``first_stage_extra`` decoder layers, and
    the last stage the final norm, head and loss, worth ``last_stage_extra`` layers. With
    ``total = num_layers + first_stage_extra + last_stage_extra``, stage ``s`` ends where the cumulative
    cost reaches ``(s + 1) * total / num_stages`` (rounded half up to whole layers), with at least one
    layer per stage.

    Args:
        num_layers (int): decoder layers.
        num_stages (int): pipeline stages (all ranks, all virtual stages).
        first_stage_extra (float): cost of stage 0's non-layer modules in decoder layers. Default is 1.0.
        last_stage_extra (float): cost of the last stage's non-layer modules in decoder layers. Default is 1.0.

    Returns:
        List[int]: layers per stage, summing to ``num_layers``.

    Example:
        >>> balanced_layer_split(88, 8)
        [10, 12, 11, 11, 11, 12, 11, 10]
    """
    validate_pipeline_stages(num_layers, num_stages)
    total = num_layers + first_stage_extra + last_stage_extra
    ends = []
    for s in range(num_stages - 1):
        end = math.floor((s + 1) * total / num_stages - first_stage_extra + 0.5)
        ends.append(min(max(end, s + 1, ends[-1] + 1 if ends else 1), num_layers - (num_stages - 1 - s)))
    bounds = [0, *ends, num_layers]
    return [bounds[i + 1] - bounds[i] for i in range(num_stages)]


def resolve_layer_split(
    num_layers: int,
    num_stages: int,
    split: Optional[Sequence[int]] = None,
    first_stage_extra: float = 1.0,
    last_stage_extra: float = 1.0,
) -> List[int]:
    """Layers per stage from a config override, or the balanced default.

    Args:
        num_layers (int): decoder layers.
        num_stages (int): pipeline stages.
        split (Optional[Sequence[int]]): config key ``pipeline_split``: either ``num_stages`` layer counts
            summing to ``num_layers`` (e.g. ``[3, 5, 5, 3]``), or ``num_stages - 1`` increasing boundaries,
            the first layer index of stages 1.. (e.g. ``[3, 8, 13]``). None for :func:`balanced_layer_split`.
            Default is None.
        first_stage_extra (float): see :func:`balanced_layer_split`. Default is 1.0.
        last_stage_extra (float): see :func:`balanced_layer_split`. Default is 1.0.

    Returns:
        List[int]: layers per stage.

    Raises:
        ValueError: if ``split`` is neither form, or leaves a stage empty.
    """
    if split is None:
        return balanced_layer_split(num_layers, num_stages, first_stage_extra, last_stage_extra)
    split = [int(x) for x in split]
    if len(split) == num_stages and sum(split) == num_layers:
        counts = split
    elif len(split) == num_stages - 1 and all(a < b for a, b in zip([0, *split], [*split, num_layers])):
        bounds = [0, *split, num_layers]
        counts = [bounds[i + 1] - bounds[i] for i in range(num_stages)]
    else:
        raise ValueError(
            f"pipeline_split={split} fits neither form for {num_layers} layers and {num_stages} stages: give "
            f"{num_stages} layer counts summing to {num_layers}, or {num_stages - 1} increasing boundaries "
            f"in 1..{num_layers - 1}."
        )
    if min(counts) < 1:
        raise ValueError(f"pipeline_split={split} leaves a stage without layers ({counts}).")
    return counts


class _SkippedLayer(nn.Module):
    """Parameter-free stand-in for a decoder layer owned by another stage (keeps list indices and FQNs)."""

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Return the hidden state unchanged.

        Args:
            x (torch.Tensor): hidden state ``[b, s, d]``.
            **kwargs (Any): the layer kwargs (mask, input_pos, ...), ignored.

        Returns:
            torch.Tensor: ``x``.
        """
        return x

    # TransformerDecoder asks layers[0] about KV caches; a training stage has none.
    def caches_are_enabled(self) -> bool:
        return False

    def caches_are_setup(self) -> bool:
        return False

    def setup_caches(self, *args: Any, **kwargs: Any) -> None:
        pass

    def reset_cache(self) -> None:
        pass


def is_stage_stand_in(module: nn.Module) -> bool:
    """Whether ``module`` only stands in for a part owned by another pipeline stage.

    Use it to keep FSDP (and similar per-module wrapping) off the stand-ins, e.g. a shard condition
    ``lambda name, m: not is_stage_stand_in(m) and training.get_shard_conditions(name, m)``.

    Args:
        module (nn.Module): any module.

    Returns:
        bool: True for a skipped decoder layer or an ``nn.Identity``.
    """
    return isinstance(module, (_SkippedLayer, nn.Identity))


class StageImages:
    """The encoder inputs of a whole batch, carried through the schedule as one opaque (replicated) object.

    The microbatch splitter would cut every tensor of ``encoder_input`` along dim 0 into
    ``n_microbatches`` pieces, which is wrong for a variable number of images per sample. Instead the
    first stage gets this holder and the microbatch's ``sample_idx`` and selects its own images.

    Per encoder, if its input dict has ``images_per_sample`` (``[B]``), every other tensor is per image
    (dim 0 = total images, in sample order) and is row-selected; ``images_per_sample`` is indexed by
    sample. Without ``images_per_sample`` every tensor is per sample (dim 0 = B). Non-tensors pass through.

    Args:
        encoder_input (Dict[str, Dict[str, Any]]): the batch's ``encoder_input``.
    """

    def __init__(self, encoder_input: Dict[str, Dict[str, Any]]):
        self.encoder_input = encoder_input
        # Image rows of each sample, computed once per step on the CPU (one device sync).
        self._rows: Dict[str, List[List[int]]] = {}
        for name, inp in encoder_input.items():
            if "images_per_sample" in inp:
                counts = inp["images_per_sample"].tolist()
                starts = [sum(counts[:i]) for i in range(len(counts))]
                self._rows[name] = [list(range(st, st + c)) for st, c in zip(starts, counts)]

    def select(self, sample_idx: torch.Tensor) -> Dict[str, Dict[str, Any]]:
        """The encoder inputs of the samples ``sample_idx``.

        Args:
            sample_idx (torch.Tensor): indices of the microbatch's samples in the batch.

        Returns:
            Dict[str, Dict[str, Any]]: ``encoder_input`` restricted to those samples.
        """
        samples = sample_idx.tolist()
        out = {}
        for name, inp in self.encoder_input.items():
            sel = {}
            rows = self._rows.get(name)
            for key, value in inp.items():
                if not isinstance(value, torch.Tensor):
                    sel[key] = value
                    continue
                per_sample = rows is None or key == "images_per_sample"
                idx = samples if per_sample else [r for b in samples for r in rows[b]]
                sel[key] = value.index_select(0, torch.tensor(idx, dtype=torch.long, device=value.device))
            out[name] = sel
        return out


def _first_stage_forward(
    self: EarlyFusionModel,
    tokens: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    encoder_input: Any = None,
    input_pos: Optional[torch.Tensor] = None,
    sample_idx: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> torch.Tensor:
    if isinstance(encoder_input, StageImages):
        encoder_input = encoder_input.select(sample_idx)
    # type(self) may be FSDP's dynamic subclass; its forward is the model's own.
    return type(self).forward(self, tokens, mask=mask, encoder_input=encoder_input, input_pos=input_pos)


def _later_stage_forward(
    self: EarlyFusionModel,
    h: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    input_pos: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> torch.Tensor:
    # The decoder's tok_embeddings is nn.Identity in an EarlyFusionModel, so it accepts hidden states.
    return self.decoder(h, mask=mask, input_pos=input_pos)


def _hidden_state_out(h: torch.Tensor) -> torch.Tensor:
    # Replaces TransformerDecoder.unembed on non-last stages: no norm, no head, no .float().
    return h


def cut_pipeline_stage(model: EarlyFusionModel, stage_id: int, layer_split: Sequence[int]) -> EarlyFusionModel:
    """One pipeline stage of ``model``: a deep copy with every module the stage does not own replaced.

    The model is not modified. On the meta device the copy is free; use it that way for real sizes.

    Args:
        model (EarlyFusionModel): the full model, ideally on the meta device.
        stage_id (int): global stage index.
        layer_split (Sequence[int]): decoder layers per stage (see :func:`resolve_layer_split`).

    Returns:
        EarlyFusionModel: the stage module; its parameter names are full-model FQNs.

    Raises:
        TypeError: if ``model`` is not an ``EarlyFusionModel``.
        ValueError: for tied embeddings across stages or ``output_hidden_states``.
    """
    if not isinstance(model, EarlyFusionModel):
        raise TypeError(f"Pipeline stages are cut from a torchtune EarlyFusionModel, got {type(model).__name__}.")
    num_stages = len(layer_split)
    if sum(layer_split) != len(model.decoder.layers):
        raise ValueError(f"layer_split {list(layer_split)} does not cover {len(model.decoder.layers)} layers.")
    if isinstance(model.decoder.output, TiedLinear) and num_stages > 1:
        raise ValueError(
            "The output head is tied to the token embeddings, which live on the first and last pipeline stage. "
            "Tied embeddings are not supported with pipeline_parallel_dim > 1."
        )
    if model.decoder.output_hidden_states:
        raise ValueError("output_hidden_states changes the stage outputs; it must be empty with pipelining.")

    first, last = stage_id == 0, stage_id == num_stages - 1
    start = sum(layer_split[:stage_id])
    end = start + layer_split[stage_id]

    stage = copy.deepcopy(model)
    for i in range(len(stage.decoder.layers)):
        if not start <= i < end:
            stage.decoder.layers[i] = _SkippedLayer()
    if first:
        stage.forward = types.MethodType(_first_stage_forward, stage)
    else:
        stage.tok_embeddings = nn.Identity()
        stage.encoders = nn.ModuleDict()
        stage.forward = types.MethodType(_later_stage_forward, stage)
    if not last:
        stage.decoder.norm = nn.Identity()
        stage.decoder.output = nn.Identity()
        stage.decoder.unembed = _hidden_state_out
    stage.pipeline_stage_id = stage_id
    return stage


SUPPORTED_LOSSES = (
    "torchtune.modules.loss.CEWithChunkedOutputLoss (or a loss with its sum-reduced compute_cross_entropy), "
    "torch.nn.CrossEntropyLoss (ignore_index and label_smoothing honoured; no weight, and no label_smoothing "
    "under tensor parallelism's loss parallel)"
)


class PipelineLoss:
    """Cross-entropy of one microbatch divided by the token count of the whole global batch.

    ``sum over microbatches (and data-parallel ranks) = sum-CE(global batch) / num_tokens``, the same loss
    and gradients as without pipelining. A microbatch without valid labels contributes 0. Accepts logits as
    one tensor or as a list/tuple of chunks along the sequence (``set_num_output_chunks``); DTensor logits
    sharded on the vocabulary work under ``loss_parallel()``. Every layout of the recipe computes its loss
    through this class, so a loss it cannot reproduce is refused here rather than replaced.

    Args:
        loss_fn (Optional[nn.Module]): the recipe's loss (see ``SUPPORTED_LOSSES``); its
            ``compute_cross_entropy(logits, labels)`` (sum-reduced, torchtune's ``CEWithChunkedOutputLoss``) is
            used when present, else ``F.cross_entropy(..., reduction="sum")`` with the ``label_smoothing`` of a
            ``torch.nn.CrossEntropyLoss``. Default is None (plain cross-entropy).
        ignore_index (int): label to ignore when ``loss_fn`` has none. Default is -100.
        loss_parallel (bool): whether the logits are vocabulary-sharded DTensors (tensor parallelism's loss
            parallel), where torch has no label smoothing. Default is False.

    Raises:
        ValueError: if ``loss_fn`` is not one of ``SUPPORTED_LOSSES`` or uses an option they cannot honour.
    """

    def __init__(self, loss_fn: Optional[nn.Module] = None, ignore_index: int = -100, loss_parallel: bool = False):
        self.loss_fn = loss_fn
        self.ignore_index = getattr(loss_fn, "ignore_index", ignore_index)
        self.label_smoothing = 0.0
        name = f"{type(loss_fn).__module__}.{type(loss_fn).__qualname__}"
        if loss_fn is None or hasattr(loss_fn, "compute_cross_entropy"):
            pass
        elif isinstance(loss_fn, nn.CrossEntropyLoss):
            if loss_fn.weight is not None:
                raise ValueError(f"loss: {name} with a class weight is not supported. Supported: {SUPPORTED_LOSSES}")
            self.label_smoothing = float(loss_fn.label_smoothing)
            if self.label_smoothing and loss_parallel:
                raise ValueError(
                    f"loss.label_smoothing={self.label_smoothing} cannot run under loss parallel (torch's "
                    "vocabulary-parallel cross-entropy has no label smoothing): set loss.label_smoothing=0, or use "
                    "tensor_parallel_dim=1. Supported: " + SUPPORTED_LOSSES
                )
        else:
            raise ValueError(
                f"loss._component_={name} is not supported by this recipe, which computes the summed "
                f"cross-entropy over the global batch's label tokens on every layout. Supported: {SUPPORTED_LOSSES}"
            )

    def _sum_ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.reshape(-1, logits.size(-1))
        labels = labels.reshape(-1)
        if hasattr(self.loss_fn, "compute_cross_entropy"):
            return self.loss_fn.compute_cross_entropy(logits, labels)
        if self.label_smoothing:
            return F.cross_entropy(
                logits.float(),
                labels,
                ignore_index=self.ignore_index,
                reduction="sum",
                label_smoothing=self.label_smoothing,
            )
        return F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index, reduction="sum")

    def __call__(self, logits: Any, labels: torch.Tensor, num_tokens: Union[float, torch.Tensor]) -> torch.Tensor:
        """Sum-CE of the microbatch / ``num_tokens``.

        Args:
            logits (Any): ``[b, s, v]`` tensor, or a list/tuple of ``[b, s_i, v]`` chunks.
            labels (torch.Tensor): ``[b, s]``, already aligned with the logits (shifted).
            num_tokens (Union[float, torch.Tensor]): valid labels in the whole global batch (all microbatches,
                all dp ranks); a number or a 0-dim tensor.

        Returns:
            torch.Tensor: scalar loss.
        """
        if isinstance(logits, (list, tuple)):
            sizes = [c.size(1) for c in logits]
            loss = sum(self._sum_ce(c, t) for c, t in zip(logits, labels.split(sizes, dim=1)))
        else:
            loss = self._sum_ce(logits, labels)
        return loss / num_tokens


def set_fsdp_gradient_sum(module: nn.Module) -> None:
    """Make every FSDP2 module of ``module`` sum (not average) gradients over data-parallel ranks.

    The loss is already divided by the global token count, so the FSDP average would divide twice.
    ``set_gradient_divide_factor`` does not recurse, so it is set on each FSDP module. The reduction is
    forced to a plain sum, which gloo needs (it has no PREMUL_SUM) and NCCL does not mind.

    Args:
        module (nn.Module): a model or pipeline stage after ``fully_shard``.
    """
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)


class ReducingPipelineStage(PipelineStage):
    """A ``PipelineStage`` whose FSDP2 stage module reduces and reshards after every micro-batch's full backward.

    torch's stage turns FSDP2's gradient sync and reshard-after-backward off for all but the last micro-batch
    (``backward_maybe_with_nosync``), so each stage keeps its gradients unsharded (accumulated in the reduce
    dtype) next to the sharded ones, and its unsharded parameters between micro-batches. Where FSDP2's mesh has
    one rank (data parallel 1) the reduce-scatter and all-gather are local copies: reducing each micro-batch's
    gradient into the sharded gradient and resharding costs no communication and frees both. The sum is the same
    (each micro-batch's gradient added in the reduce dtype, in micro-batch order). A split backward (input and
    weight, the zero-bubble schedules) keeps torch's path: its weight gradients do not exist yet after "input".

    Args:
        *args (Any): ``PipelineStage``'s arguments.
        reduce_every_microbatch (bool): reduce and reshard after every full backward. Default is False.
        **kwargs (Any): ``PipelineStage``'s keyword arguments.
    """

    def __init__(self, *args: Any, reduce_every_microbatch: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reduce_every_microbatch = reduce_every_microbatch

    def backward_maybe_with_nosync(self, backward_type: str, bwd_kwargs: dict, last_backward: bool = False):
        """FSDP2's own per-backward reduce and reshard for a full backward, else torch's no-sync accumulation.

        Args:
            backward_type (str): "full", "input" or "weight" (see ``PipelineStage``).
            bwd_kwargs (dict): the stage output, its gradients and the stage inputs.
            last_backward (bool): whether this is the step's last backward of this stage. Default is False.

        Returns:
            tuple: the input gradients and (for "input") the parameter groups, as torch's method.
        """
        if not (self.reduce_every_microbatch and backward_type == "full" and isinstance(self.submod, FSDPModule)):
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward=last_backward)
        # FSDP2's defaults, as in a training step without pipelining: the post-backward hooks reduce-scatter into
        # the sharded gradients (adding to them) and reshard; the final sync of torch's schedule then finds none.
        self.submod.set_is_last_backward(True)
        self.submod.set_reshard_after_backward(True)
        self.submod.set_requires_gradient_sync(True)
        grads = stage_backward(bwd_kwargs["stage_output"], bwd_kwargs["output_grads"], bwd_kwargs["input_values"])
        return grads, None


@dataclass
class Pipeline:
    """The pipeline built for one rank.

    Attributes:
        schedule (_PipelineSchedule): the torch schedule; run with :func:`pipeline_step`.
        model_parts (List[nn.Module]): this rank's stage modules (optimizer, checkpoint and clipping go over
            all of them).
        stage_ids (List[int]): their global stage indices.
        num_stages (int): stages over all pipeline ranks.
        layer_split (List[int]): decoder layers per stage.
        n_microbatches (int): microbatches per step.
    """

    schedule: _PipelineSchedule
    model_parts: List[nn.Module]
    stage_ids: List[int]
    num_stages: int
    layer_split: List[int]
    n_microbatches: int

    @property
    def has_first(self) -> bool:
        """bool: whether this rank holds stage 0 (it feeds tokens and images)."""
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        """bool: whether this rank holds the last stage (it feeds labels and gets the loss)."""
        return self.num_stages - 1 in self.stage_ids


def build_pipeline(
    model: EarlyFusionModel,
    pp_mesh: DeviceMesh,
    *,
    schedule: str,
    n_microbatches: int,
    loss_fn: Callable,
    device: torch.device,
    split: Optional[Sequence[int]] = None,
    stages_per_rank: Optional[int] = None,
    parallelize_fn: Optional[Callable[[nn.Module], Optional[nn.Module]]] = None,
    first_stage_extra: float = 1.0,
    last_stage_extra: float = 1.0,
    reduce_every_microbatch: bool = False,
) -> Pipeline:
    """Cut ``model`` into this rank's stages, parallelize them, and build the schedule.

    Args:
        model (EarlyFusionModel): the full model on the meta device (it is deep-copied, not changed).
        pp_mesh (DeviceMesh): 1-D pipeline mesh (``mesh["pp"]``).
        schedule (str): config key ``pipeline_schedule``, see :func:`get_pipeline_schedule_class`.
        n_microbatches (int): config key ``pipeline_microbatches``.
        loss_fn (Callable): ``loss_fn(logits, labels, num_tokens)``, e.g. :class:`PipelineLoss`.
        device (torch.device): device of the stages.
        split (Optional[Sequence[int]]): config key ``pipeline_split`` (see :func:`resolve_layer_split`).
            Default is None (balanced).
        stages_per_rank (Optional[int]): virtual stages per rank; None for the schedule's default
            (1, or 2 for interleaved / zero-bubble schedules). Default is None.
        parallelize_fn (Optional[Callable[[nn.Module], Optional[nn.Module]]]): applied to each stage module:
            the recipe's lays it out (:func:`~torchtune_mistral3.training.parallelize_model`), materialises it
            and loads its weights; it may return a replacement module. Default is None.
        first_stage_extra (float): see :func:`balanced_layer_split`. Default is 1.0.
        last_stage_extra (float): see :func:`balanced_layer_split`. Default is 1.0.
        reduce_every_microbatch (bool): FSDP2 reduces and reshards each stage after every micro-batch's
            backward (:class:`ReducingPipelineStage`; for a data-parallel degree of 1, where that costs no
            communication). Default is False (torch's accumulation over the micro-batches).

    Returns:
        Pipeline: schedule, stage modules and flags for this rank.
    """
    schedule_cls = get_pipeline_schedule_class(schedule)
    pp_size, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    stages_per_rank = stages_per_rank or default_stages_per_rank(schedule_cls)
    validate_pipeline_schedule(schedule_cls, n_microbatches, pp_size, stages_per_rank)
    num_stages = pp_size * stages_per_rank
    layer_split = resolve_layer_split(
        len(model.decoder.layers), num_stages, split, first_stage_extra, last_stage_extra
    )
    stage_ids = stage_ids_for_rank(schedule_cls, pp_rank, pp_size, stages_per_rank)

    parts, stages = [], []
    for stage_id in stage_ids:
        part = cut_pipeline_stage(model, stage_id, layer_split)
        if parallelize_fn is not None:
            part = parallelize_fn(part) or part
        parts.append(part)
        stages.append(ReducingPipelineStage(
            part, stage_id, num_stages, device, group=pp_mesh.get_group(),
            reduce_every_microbatch=reduce_every_microbatch,
        ))

    kwargs = dict(n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    if issubclass(schedule_cls, PipelineScheduleSingle):
        sched = schedule_cls(stages[0], **kwargs)
    else:
        sched = schedule_cls(stages, **kwargs)
    return Pipeline(sched, parts, stage_ids, num_stages, layer_split, n_microbatches)


def pipeline_step(
    pipeline: Pipeline,
    batch: Dict[str, Any],
    labels: Optional[torch.Tensor],
    num_tokens: Union[float, torch.Tensor],
    forward_only: bool = False,
) -> Optional[torch.Tensor]:
    """Run forward and backward (or forward only) of one (data-parallel-local) batch through the pipeline.

    Every rank of the pipeline group calls it with the same batch (all ranks of a data-parallel
    replica load the same batch). Microbatch shapes are frozen at the first call: keep the batch size
    and the padded sequence length constant.

    Args:
        pipeline (Pipeline): from :func:`build_pipeline`.
        batch (Dict[str, Any]): ``tokens [b, s]`` and optionally ``encoder_input``, ``mask``, ``input_pos``
            (the collate output without ``labels``).
        labels (Optional[torch.Tensor]): ``[b, s]`` labels aligned with the logits (already shifted).
        num_tokens (Union[float, torch.Tensor]): valid labels of the global batch (summed over data-parallel
            ranks); a number or a 0-dim tensor on the device.
        forward_only (bool): evaluation: forward and loss, no backward (``schedule.eval``). Default is False.

    Returns:
        Optional[torch.Tensor]: on the last-stage rank the summed (detached) loss of this rank's microbatches,
        i.e. its share of the global loss; None elsewhere.

    Raises:
        ValueError: if the batch size is not divisible by the microbatches, or the batch shape changed since the
            first step.
        NotImplementedError: for ``forward_only`` with a "v" schedule (ZBVZeroBubble, DualPipeV): torch runs
            their backward actions in ``eval`` too.
    """
    if forward_only and isinstance(pipeline.schedule, _V_SCHEDULES):
        raise NotImplementedError(
            f"{type(pipeline.schedule).__name__} cannot run forward-only in torch (its eval still runs backward "
            "actions). Use pipeline_schedule Interleaved1F1B, InterleavedZeroBubble, 1F1B or GPipe to evaluate."
        )
    tokens = batch["tokens"]
    shape = tuple(tokens.shape)
    first_shape = getattr(pipeline, "_batch_shape", None)
    if shape[0] % pipeline.n_microbatches != 0:
        raise ValueError(
            f"A batch of {shape[0]} samples does not split into pipeline_microbatches={pipeline.n_microbatches} "
            "equal microbatches; make batch_size a multiple of it."
        )
    if first_shape is None:
        pipeline._batch_shape = shape
    elif shape != first_shape:
        raise ValueError(
            f"Pipeline stages were shaped for batches of {list(first_shape)} tokens, got {list(shape)}. "
            "With pipeline_parallel_dim > 1 pad every batch to the same length and drop the last partial batch."
        )

    kwargs = {k: batch[k] for k in ("mask", "input_pos") if batch.get(k) is not None}
    args = ()
    if pipeline.has_first:
        args = (tokens,)
        if batch.get("encoder_input"):
            kwargs["encoder_input"] = StageImages(batch["encoder_input"])
            kwargs["sample_idx"] = torch.arange(shape[0])
    run = pipeline.schedule.eval if forward_only else pipeline.schedule.step
    if not pipeline.has_last:
        run(*args, return_outputs=False, **kwargs)
        return None
    losses: List[torch.Tensor] = []
    run(
        *args, target=labels, losses=losses, loss_kwargs={"num_tokens": num_tokens}, return_outputs=False, **kwargs
    )
    losses = [x.full_tensor() if isinstance(x, DTensor) else x for x in losses]
    return torch.stack([x.detach().float() for x in losses]).sum()
