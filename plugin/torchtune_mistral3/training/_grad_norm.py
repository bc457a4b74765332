"""Gradient-norm clipping that is correct under any mix of TP, PP and FSDP2."""

import math
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _group_by_layout(params: List[torch.Tensor]) -> Dict[Tuple, List[torch.Tensor]]:
    # Gradients on different meshes (FSDP-only vs FSDP x TP) or plain tensors cannot be
    # stacked into one foreach norm, so each layout gets its own group. Dict order follows
    # parameter order, so every rank of a mesh issues the same collectives in the same order.
    groups: Dict[Tuple, List[torch.Tensor]] = {}
    for p in params:
        if isinstance(p.grad, DTensor):
            key = (p.grad.device_mesh, tuple(p.grad.placements))
        else:
            key = (None, ())
        groups.setdefault(key, []).append(p)
    return groups


def clip_grad_norm_(
    parameters: Union[torch.Tensor, Iterable[torch.Tensor]],
    max_norm: float,
    norm_type: float = 2.0,
    pp_group: Optional[dist.ProcessGroup] = None,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
) -> torch.Tensor:
    """Clip the gradients of a model that may be split over pipeline stages, TP and FSDP meshes.

    Works like :func:`torch.nn.utils.clip_grad_norm_` on the whole (unsplit) model: the total norm is
    taken over every parameter exactly once, wherever it lives.

    1. local parameters are grouped by the layout of their gradient (plain tensor, or DTensor
       ``(mesh, placements)``);
    2. each group's norm is reduced over the mesh its gradients are sharded on (``full_tensor``),
       so Replicate and plain gradients count once and Shard ones are summed over shards;
    3. the groups are combined, then over the pipeline stages with one ``all_reduce`` on ``pp_group``
       (stages hold disjoint parameters);
    4. every group is scaled by ``max_norm / total_norm`` when that is below 1.

    Args:
        parameters (Union[torch.Tensor, Iterable[torch.Tensor]]): this rank's parameters (all its stages).
        max_norm (float): maximum total norm.
        norm_type (float): p of the p-norm; ``inf`` for the max-norm. Default is 2.0.
        pp_group (Optional[dist.ProcessGroup]): pipeline group (``mesh["pp"].get_group()``); None without PP.
            Default is None.
        error_if_nonfinite (bool): raise if the total norm is nan or inf. Default is False.
        foreach (Optional[bool]): forwarded to the torch norm and clip kernels. Default is None.

    Returns:
        torch.Tensor: the total norm of the unclipped gradients (a plain 0-dim tensor, same on all ranks).

    Raises:
        RuntimeError: if ``error_if_nonfinite`` and the total norm is nan or inf.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    groups = _group_by_layout(params)

    device = params[0].device if params else _group_device(pp_group)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type, False, foreach)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        norm = norm.float().to(device)
        total = torch.maximum(total, norm) if math.isinf(norm_type) else total + norm**norm_type

    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
        dist.all_reduce(total, op=op, group=pp_group)
    if not math.isinf(norm_type):
        total = total ** (1.0 / norm_type)

    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} of the gradients is non-finite ({total.item()}), so it cannot "
            "be clipped. Set error_if_nonfinite=False to clip anyway."
        )
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach)
    return total


def _group_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    # A rank without gradients still joins the pp all_reduce; gloo wants CPU, NCCL the current GPU.
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
