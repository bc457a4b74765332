"""The image encoders' work shared over the tensor-parallel group (config key ``tensor_parallel_tower``).

The TP plan leaves the vision tower and projector replicated, so without this every TP rank would encode every
image of the micro-batch. With ``tensor_parallel_tower: split`` (the default under TP) each rank encodes its share
of the images, balanced by cost, and the projected features are all-gathered over the TP group and put back in
image order: the decoder sees exactly the replicated encoder's features.

Autograd: the first decoder layer's column-wise projections all-reduce their input gradient over the TP group, so
the gradient reaching the image embeddings is the same on every TP rank; the gather's backward keeps this rank's
rows, with no collective. The encoder's trainable parameters then hold only this rank's share of their gradient:
:func:`sum_split_encoder_grads` adds the shares over the TP group, once per optimizer step, before clipping.
"""

import heapq
import types
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

TOWER_MODES = ("split", "replicate")


def tower_mode(value: Optional[str], tensor_parallel_dim: int) -> str:
    """Resolve the config key ``tensor_parallel_tower``.

    Args:
        value (Optional[str]): the config's value; None means the default.
        tensor_parallel_dim (int): the TP degree.

    Returns:
        str: ``"split"`` or ``"replicate"``; always ``"replicate"`` without TP (nothing to share).

    Raises:
        ValueError: for another value.
    """
    mode = "split" if value is None else str(value).lower()
    if mode not in TOWER_MODES:
        raise ValueError(
            f"tensor_parallel_tower={value} is not one of {list(TOWER_MODES)}: 'split' shares the images of a "
            "micro-batch over the tensor-parallel ranks, 'replicate' encodes every image on every rank"
        )
    return mode if tensor_parallel_dim > 1 else "replicate"


def assign_images(costs: Sequence[int], ranks: int) -> List[List[int]]:
    """Share images over ranks by cost: longest first onto the least-loaded rank (ties: lower index, lower rank).

    Deterministic, so every rank computes the same assignment from the same sizes.

    Args:
        costs (Sequence[int]): cost of each image (e.g. its embeddings, proportional to its patches).
        ranks (int): number of ranks.

    Returns:
        List[List[int]]: for each rank, its images' indices in ascending order (possibly none).
    """
    load = [(0, r) for r in range(ranks)]
    shares: List[List[int]] = [[] for _ in range(ranks)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        total, r = heapq.heappop(load)
        shares[r].append(i)
        heapq.heappush(load, (total + costs[i], r))
    return [sorted(s) for s in shares]


class _GatherShares(torch.autograd.Function):
    """All-gather every rank's features (padded to the largest share) and reorder the rows into image order.

    Backward keeps this rank's rows only: the incoming gradient is the same on every TP rank.
    """

    @staticmethod
    def forward(
        ctx: Any, local: torch.Tensor, group: dist.ProcessGroup, rows: int, order: torch.Tensor, mine: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(mine)
        # [rows_mine, d] -> [rows, d] -> [ranks * rows, d]
        padded = torch.cat((local, local.new_zeros(rows - local.shape[0], local.shape[1])))
        gathered = padded.new_empty(dist.get_world_size(group) * rows, local.shape[1])
        dist.all_gather_single(gathered, padded.contiguous(), group=group)
        return gathered.index_select(0, order)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        (mine,) = ctx.saved_tensors
        return grad.index_select(0, mine), None, None, None, None


def _split_forward(
    self: nn.Module,
    pixel_values: torch.Tensor,
    image_sizes: torch.Tensor,
    images_per_sample: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    # Replaces the encoder's forward on its instance; type(self).forward is the encoder's own (also under FSDP's
    # dynamic subclass). Collectives stay here, outside the compiled transformer blocks.
    group = self._tp_split_group
    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    tokens = self.tokens_per_image(image_sizes)
    if not tokens:  # no image in the micro-batch (every TP rank sees the same one): nothing to share
        return type(self).forward(self, pixel_values, image_sizes)
    shares = assign_images(tokens, ranks)
    mine = shares[rank]
    idx = torch.tensor(mine, dtype=torch.long, device=pixel_values.device)
    pixels, sizes = pixel_values.index_select(0, idx), image_sizes.index_select(0, idx.to(image_sizes.device))
    if mine:  # crop the padding of images other ranks encode
        h, w = (int(x) for x in sizes.amax(0).tolist())
        pixels = pixels[:, :, :h, :w]
    if torch.is_grad_enabled():
        self._tp_split_ran = True
    # [rows_mine, d]; a rank without images still runs the encoder (empty), as data-parallel peers expect
    local = type(self).forward(self, pixels, sizes)

    start = [0]
    for t in tokens:
        start.append(start[-1] + t)
    rows = max(sum(tokens[i] for i in s) for s in shares)
    where = [0] * len(tokens)  # first gathered row of each image
    for r, share in enumerate(shares):
        offset = r * rows
        for i in share:
            where[i] = offset
            offset += tokens[i]
    order = torch.cat([torch.arange(where[i], where[i] + t) for i, t in enumerate(tokens)])
    own = torch.cat([torch.arange(start[i], start[i + 1]) for i in mine]) if mine else torch.zeros(0, dtype=torch.long)
    device = local.device
    return _GatherShares.apply(local, group, rows, order.to(device), own.to(device))


def split_image_encoders(model: nn.Module, tp_mesh: DeviceMesh) -> int:
    """Make every encoder of ``model`` (a model or pipeline stage) encode only this TP rank's share of the images.

    Patches each encoder's ``forward`` in place (its parameter names do not change). An encoder must take the
    plugin's batch contract (``pixel_values [n, ...]``, ``image_sizes [n, 2]``, ``images_per_sample``) and have
    ``tokens_per_image(image_sizes)``, the rows it returns per image (also the cost used to share the images).
    Call it after tensor parallelism, before activation checkpointing, compile and FSDP; then call
    :func:`sum_split_encoder_grads` before clipping at every optimizer step.

    Args:
        model (nn.Module): an ``EarlyFusionModel`` or one pipeline stage (later stages have no encoders).
        tp_mesh (DeviceMesh): 1-D tensor parallel mesh (``mesh["tp"]``).

    Returns:
        int: the number of encoders patched.

    Raises:
        ValueError: if an encoder has no ``tokens_per_image``.
    """
    encoders = getattr(model, "encoders", None) or {}
    for name, encoder in encoders.items():
        if not callable(getattr(encoder, "tokens_per_image", None)):
            raise ValueError(
                f"encoders.{name} ({type(encoder).__name__}) has no tokens_per_image(image_sizes), so its images "
                "cannot be shared over the tensor-parallel ranks: set tensor_parallel_tower=replicate"
            )
        encoder._tp_split_group = tp_mesh.get_group()
        encoder._tp_split_ran = False
        encoder.forward = types.MethodType(_split_forward, encoder)
    return len(encoders)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def sum_split_encoder_grads(model_parts: Sequence[nn.Module]) -> None:
    """Sum the gradients of the split encoders' trainable parameters over their TP group.

    Call once per optimizer step, after the last micro-batch's backward and before clipping (and before the
    optimizer step). Under FSDP a gradient is this rank's data-parallel shard, the same shard on every rank of a
    TP group, and it holds the images of every data-parallel replica: it is summed whether or not this replica's
    batch had images. The ranks of a TP group agree on whether to sum: without FSDP they saw the same batches
    (the encoder ran on all of them or on none), and FSDP gives every parameter a gradient. When it sums, a
    parameter without a gradient counts as zero (the replicated encoder would have given it one).

    Args:
        model_parts (Sequence[nn.Module]): this rank's model or pipeline stages.
    """
    for part in model_parts:
        for encoder in part.modules():
            group = getattr(encoder, "_tp_split_group", None)
            if group is None:
                continue
            params = [p for p in encoder.parameters() if p.requires_grad]
            ran, encoder._tp_split_ran = encoder._tp_split_ran, False
            if not (ran or any(p.grad is not None for p in params)):
                continue
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [_local(p.grad) for p in params]
            for dtype in dict.fromkeys(g.dtype for g in grads):
                same = [g for g in grads if g.dtype == dtype]
                # [sum of numel]: one collective for all of this dtype's gradients
                flat = torch.cat([g.reshape(-1) for g in same])
                dist.all_reduce(flat, group=group)
                for g, new in zip(same, flat.split([g.numel() for g in same])):
                    g.copy_(new.view_as(g))
