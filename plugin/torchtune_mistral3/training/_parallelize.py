"""The parallel layout of one model part in one fixed order (:func:`parallelize_model`), then on the device.

The training recipe calls it on the meta-device model, or through the pipeline builder on each stage; it reads
no config, so any trainer or test can call it. The numbered comments in its body say why each step comes where
it does (docs/parallelism.md, "The layout of a model part"). :func:`materialize` then allocates the part and
computes its RoPE buffers; loading the weights is the caller's.
"""

from functools import partial
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle
from torchtune import modules, training, utils
from torchtune.training.activations import apply_selective_activation_checkpointing

from ._compile import compile_blocks
from ._pipeline import is_stage_stand_in, set_fsdp_gradient_sum
from ._precision import PrecisionPolicy, convert_to_fp8, shard_model
from ._tower_split import split_image_encoders
from ._tp import apply_tensor_parallel

log = utils.get_logger("INFO")


def _shard_condition(name: str, module: nn.Module, names_to_match: Optional[List[str]] = None) -> bool:
    """Torchtune's FSDP wrapping rule (``layers.N``), minus the parameter-free stand-ins of pipeline stages."""
    return not is_stage_stand_in(module) and training.get_shard_conditions(name, module, names_to_match)


def parallelize_model(
    part: nn.Module,
    mesh: DeviceMesh,
    *,
    precision: PrecisionPolicy,
    tp_plan: Optional[Dict[str, ParallelStyle]] = None,
    tower_split: bool = False,
    activation_checkpointing: bool = False,
    ac_mode: Optional[str] = None,
    ac_option: Optional[int] = None,
    compile: bool = False,
    static_shapes: bool = False,
    custom_sharded_layers: Optional[List[str]] = None,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
    verbose: bool = False,
) -> nn.Module:
    """Apply the parallel layout to ``part`` in place: FP8 -> TP -> tower split -> AC -> compile -> FSDP2.

    See the module docstring for why this order. TP runs when ``mesh["tp"]`` has more than one rank; FSDP2 when
    ``mesh["dp"]`` has, or when the precision policy casts the master weights to the compute dtype (FSDP2's
    mixed precision, also on one data-parallel rank).

    Args:
        part (nn.Module): the model or one pipeline stage, on the meta device.
        mesh (DeviceMesh): the ``("pp", "dp", "tp")`` mesh (:meth:`ParallelDims.build_mesh`).
        precision (PrecisionPolicy): FP8 recipe and FSDP2's mixed precision.
        tp_plan (Optional[Dict[str, ParallelStyle]]): FQN glob -> style; needed when ``mesh["tp"]`` has more
            than one rank. Default is None.
        tower_split (bool): each TP rank encodes its share of the images (``tensor_parallel_tower: split``).
            Default is False.
        activation_checkpointing (bool): checkpoint every transformer block (unless ``ac_mode``). Default is False.
        ac_mode (Optional[str]): torchtune's selective activation checkpointing mode. Default is None.
        ac_option (Optional[int]): its option. Default is None.
        compile (bool): compile every transformer block. Default is False.
        static_shapes (bool): compile the decoder blocks for one shape (compiled TP). Default is False.
        custom_sharded_layers (Optional[List[str]]): module names that get FSDP2 units of their own. Default is
            None.
        cpu_offload (bool): FSDP2 offloads parameters, gradients and optimizer states to CPU. Default is False.
        reshard_after_forward (bool): FSDP2 frees the gathered parameters after forward. Default is True.
        verbose (bool): log what is compiled and split (rank 0). Default is False.

    Returns:
        nn.Module: ``part``, laid out (still on the meta device).
    """
    tp_mesh, dp_mesh = mesh["tp"], mesh["dp"]
    # 1. FP8 (torchao) first: TP shards, compile traces and FSDP2 wraps the Float8Linear modules
    if precision.fp8_recipe is not None:
        convert_to_fp8(part, precision.fp8_recipe)
    # 2. tensor parallel: the decoder's weights become DTensors on the TP mesh
    if tp_mesh.size() > 1:
        apply_tensor_parallel(part, tp_mesh, tp_plan)
    # 3. tower split: patches the encoders' forward, outside the blocks compiled below
    if tower_split and split_image_encoders(part, tp_mesh) and verbose:
        log.info(f"The {tp_mesh.size()} TP ranks encode their share of a micro-batch's images")
    # 4. activation checkpointing wraps the TP blocks (the TP plan's names are those of the unwrapped model)
    if activation_checkpointing and ac_mode is None:
        training.set_activation_checkpointing(part, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    elif ac_mode is not None:
        apply_selective_activation_checkpointing(part, ac_mode, ac_option)
    # 5. compile each block inside its checkpoint wrapper, after TP and AC, before FSDP2 (torchtitan's order)
    if compile:
        compile_blocks(part, static_decoder_shapes=static_shapes, verbose=verbose)
    # 6. FSDP2 last; also on one data-parallel rank when it casts the master weights to the compute dtype
    if dp_mesh.size() > 1 or precision.casts_parameters:
        shard_model(
            model=part,
            shard_conditions=[partial(_shard_condition, names_to_match=custom_sharded_layers)],
            cpu_offload=cpu_offload,
            reshard_after_forward=reshard_after_forward,
            dp_mesh=dp_mesh,
            mp_policy=precision.mp_policy(),
        )
        # the loss is divided by the global token count already: FSDP2 must sum, not average
        set_fsdp_gradient_sum(part)
        # a replica whose micro-batch has no image still joins the encoders' reduce-scatter (torch >= 2.13; the
        # recipe refuses image-free micro-batches on older torch)
        if hasattr(part, "set_reduce_scatter_unused_params"):
            part.set_reduce_scatter_unused_params(True)
    return part


def materialize(part: nn.Module, device: torch.device, rope_dtype: torch.dtype) -> nn.Module:
    """Allocate ``part`` (laid out on the meta device) on ``device``, uninitialised, and compute its RoPE buffers.

    Args:
        part (nn.Module): a part after :func:`parallelize_model`.
        device (torch.device): the training device.
        rope_dtype (torch.dtype): default dtype while the RoPE caches are computed (the compute dtype).

    Returns:
        nn.Module: ``part``, on ``device``.
    """
    part.to_empty(device=device)
    with training.set_default_dtype(rope_dtype), device:
        for m in part.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
    return part
