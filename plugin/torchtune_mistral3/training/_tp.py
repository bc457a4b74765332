"""Tensor parallelism helpers: sequence-parallel styles, plans resolved against (possibly pipeline-cut) modules."""

import contextlib
import os
from fnmatch import fnmatchcase
from typing import Any, ContextManager, Dict, Optional, Tuple

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from torchtune.training import prepare_mha_for_tp

from ._parallel_dims import validate_tensor_parallel
from ._pipeline import is_stage_stand_in


class GatherSequence(ParallelStyle):
    """Module-input style: all-gather sequence-sharded (``Shard(1)``) positional inputs into full local tensors.

    ``TransformerSelfAttentionLayer`` calls ``attn(h, h, mask=..., input_pos=...)``: a ``PrepareModuleInput``
    with two ``Shard(1) -> Replicate`` inputs would all-gather the same ``h`` twice. Here each distinct tensor is
    gathered once (its gradient is then reduce-scattered once). Keyword inputs (mask, positions) pass unchanged:
    they already describe the full sequence.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def gather(_: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
            full: Dict[int, torch.Tensor] = {}
            out = []
            for arg in args:
                if isinstance(arg, torch.Tensor):
                    if id(arg) not in full:
                        shard = arg if isinstance(arg, DTensor) else DTensor.from_local(
                            arg, device_mesh, (Shard(1),), run_check=False
                        )
                        full[id(arg)] = shard.redistribute(device_mesh, (Replicate(),)).to_local()
                    arg = full[id(arg)]
                out.append(arg)
            return tuple(out)

        module.register_forward_pre_hook(gather)
        return module


class ShardSequence(ParallelStyle):
    """Module-input style: keep this rank's sequence slice of a replicated hidden state (no communication).

    The backward all-gathers the gradient, so everything before (embeddings, image features) gets the full one.

    Raises:
        ValueError: at the forward, if the sequence length is not a multiple of the TP degree.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def shard(_: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
            h, *rest = args
            if h.shape[1] % device_mesh.size() != 0:
                raise ValueError(
                    f"tensor_parallel_plan.sequence_parallel=True needs sequence lengths that are multiples of "
                    f"tensor_parallel_dim={device_mesh.size()}, got {h.shape[1]} tokens: pad the batch (the recipe "
                    "pads to a multiple; tokenizer.max_seq_len must be one)"
                )
            full = DTensor.from_local(h, device_mesh, (Replicate(),), run_check=False)
            return (full.redistribute(device_mesh, (Shard(1),)).to_local(), *rest)

        module.register_forward_pre_hook(shard)
        return module


def resolve_tp_plan(module: nn.Module, plan: Dict[str, ParallelStyle]) -> Dict[str, ParallelStyle]:
    """Expand a plan of FQN globs into the concrete FQNs of ``module`` it applies to.

    A glob ``*`` matches one name atom, as in ``parallelize_module``. Keys that only match stand-ins of a
    pipeline stage (``nn.Identity``, skipped layers) or nothing at all are dropped, so one full-model plan
    serves every stage without warnings or ``NotImplementedError`` on an ``nn.Identity``.

    Args:
        module (nn.Module): the model or one pipeline stage.
        plan (Dict[str, ParallelStyle]): FQN glob -> style, e.g. ``mistral3_tp_plan()``.

    Returns:
        Dict[str, ParallelStyle]: concrete FQN -> style.
    """
    resolved = {}
    for name, sub in module.named_modules():
        if not name or is_stage_stand_in(sub):
            continue
        atoms = name.split(".")
        for pattern, style in plan.items():
            pattern_atoms = pattern.split(".")
            if len(pattern_atoms) == len(atoms) and all(fnmatchcase(a, p) for a, p in zip(atoms, pattern_atoms)):
                resolved[name] = style
                break
    return resolved


def apply_tensor_parallel(module: nn.Module, tp_mesh: DeviceMesh, plan: Dict[str, ParallelStyle]) -> None:
    """Shard ``module`` (a model or a pipeline stage) over ``tp_mesh`` following ``plan``.

    Checks that the TP degree divides the decoder's heads (error naming ``tensor_parallel_dim``), divides the
    attention head counts by it (torchtune's ``prepare_mha_for_tp``), then applies the plan resolved against
    the module. Call it before activation checkpointing and FSDP.

    Args:
        module (nn.Module): the model or one pipeline stage, on any device (meta included).
        tp_mesh (DeviceMesh): 1-D tensor parallel mesh (``mesh["tp"]``).
        plan (Dict[str, ParallelStyle]): FQN glob -> style.
    """
    validate_tensor_parallel(module, tp_mesh.size())
    prepare_mha_for_tp(module, tp_mesh)
    parallelize_module(module, tp_mesh, resolve_tp_plan(module, plan))


def uses_loss_parallel(plan: Dict[str, ParallelStyle], output_fqn: str = "decoder.output") -> bool:
    """Whether the plan leaves the logits sharded on the vocabulary (DTensor ``Shard(-1)``).

    Then the loss (forward and backward) must run under :func:`train_context` ``(True)``.

    Args:
        plan (Dict[str, ParallelStyle]): FQN glob -> style.
        output_fqn (str): key of the output head. Default is "decoder.output".

    Returns:
        bool: True for a ``ColwiseParallel`` head with ``Shard(-1)`` output kept as DTensor.
    """
    style = plan.get(output_fqn)
    return (
        isinstance(style, ColwiseParallel)
        and not style.use_local_output
        and tuple(style.output_layouts) == (Shard(-1),)
    )


def uses_sequence_parallel(plan: Dict[str, ParallelStyle]) -> bool:
    """Whether the plan shards the residual stream on the sequence (any ``SequenceParallel`` style).

    Then every sequence length the model sees must be a multiple of the TP degree.

    Args:
        plan (Dict[str, ParallelStyle]): FQN glob -> style.

    Returns:
        bool: True if a module of the plan runs as ``SequenceParallel``.
    """
    return any(isinstance(style, SequenceParallel) for style in plan.values())


def check_sequence_parallel_length(max_seq_len: Optional[int], tp: int) -> None:
    """Check at setup that sequence-parallel batches can be padded to a multiple of the TP degree.

    Each rank holds ``s / tp`` tokens of the residual stream, so every batch is padded to a multiple of ``tp``;
    that padding must stay within ``tokenizer.max_seq_len``, which must then be a multiple of ``tp`` itself.

    Args:
        max_seq_len (Optional[int]): the config's ``tokenizer.max_seq_len``.
        tp (int): the config's ``tensor_parallel_dim``.

    Raises:
        ValueError: if ``max_seq_len`` is unset or not a multiple of ``tp``; the message names both keys.
    """
    if max_seq_len is None or int(max_seq_len) % tp != 0:
        raise ValueError(
            f"tensor_parallel_plan.sequence_parallel=True shards every sequence over tensor_parallel_dim={tp} "
            f"ranks: tokenizer.max_seq_len ({max_seq_len}) must be set to a multiple of {tp}"
        )


def check_async_tensor_parallel(enabled: bool, *, device_type: str, compile: bool, sequence_parallel: bool) -> None:
    """Check at start that torch's async tensor parallelism (config key ``tensor_parallel_async``) can work.

    Inductor's micro-pipeline TP pass overlaps an all-gather with the matmul that reads it and a matmul with the
    reduce-scatter of its output, through symmetric memory on CUDA: it needs compiled blocks (the inductor
    backend) and the sequence-parallel layout, whose collectives those are.

    Args:
        enabled (bool): the config's ``tensor_parallel_async``.
        device_type (str): the run's device type (``"cuda"``, ``"cpu"``).
        compile (bool): the config's ``compile``.
        sequence_parallel (bool): TP enabled with a sequence-parallel plan (:func:`uses_sequence_parallel`).

    Raises:
        ValueError: if enabled without all of CUDA, ``compile=True`` with inductor and
            ``tensor_parallel_plan.sequence_parallel=True``; the message names what is missing.
    """
    if not enabled:
        return
    missing = []
    if device_type != "cuda":
        missing.append(f"a CUDA device (this run uses {device_type})")
    backend = os.environ.get("TORCH_COMPILE_BACKEND", "inductor")
    if not compile or backend != "inductor":
        missing.append(f"compile=True with the inductor backend (compile={compile}, TORCH_COMPILE_BACKEND={backend})")
    if not sequence_parallel:
        missing.append("tensor_parallel_plan.sequence_parallel=True with tensor_parallel_dim > 1")
    if missing:
        raise ValueError(
            "tensor_parallel_async=True needs " + "; ".join(missing) + ". Set tensor_parallel_async=False or "
            "provide them."
        )


def enable_async_tensor_parallel(tp_mesh: DeviceMesh) -> None:
    """Turn on torch's async tensor parallelism for ``tp_mesh``'s group, before the blocks are compiled.

    Sets inductor's micro-pipeline TP pass and allocates symmetric memory for the TP process group. Check the
    preconditions with :func:`check_async_tensor_parallel` first.

    Args:
        tp_mesh (DeviceMesh): 1-D tensor parallel mesh (``mesh["tp"]``).
    """
    import torch._inductor.config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    torch._inductor.config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)


def train_context(enable_loss_parallel: bool) -> ContextManager:
    """Context for forward + loss + backward (or :func:`pipeline_step`): ``loss_parallel()`` when enabled.

    Under it ``F.cross_entropy`` on vocabulary-sharded DTensor logits reduces over the TP group
    instead of gathering the full-vocabulary logits on every rank.

    Args:
        enable_loss_parallel (bool): usually ``uses_loss_parallel(plan)`` and TP enabled.

    Returns:
        ContextManager: ``loss_parallel()`` or a null context.
    """
    return loss_parallel() if enable_loss_parallel else contextlib.nullcontext()
