"""Tensor parallel plan and default pipeline split of the Mistral 3 family (model knowledge only)."""

from typing import Dict

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from torchtune_mistral3.training._tp import GatherSequence, ShardSequence

# Cost of what the first and last pipeline stages carry besides decoder layers, in decoder layers.
# Mistral Medium 3.5 (12288 hidden, 131072 vocab, ~1.4B params per layer): the head is 1.6B params
# (~1.1 layers of matmul per token, plus the loss); the Pixtral tower (~0.4B params) runs on about 4x
# as many patches as the merged image tokens, roughly one layer for image-heavy VQA samples.
_PP_FIRST_STAGE_EXTRA_LAYERS = 1.0
_PP_LAST_STAGE_EXTRA_LAYERS = 1.0


def mistral3_tp_plan(loss_parallel: bool = True, sequence_parallel: bool = False) -> Dict[str, ParallelStyle]:
    """Tensor parallel plan of a Mistral 3 ``EarlyFusionModel``, keyed by full-model FQN globs.

    Column-wise q/k/v and gate/up (``w1``/``w3``), row-wise ``output_proj`` and down (``w2``), a
    vocabulary-parallel token embedding (``EarlyFusionModel`` keeps it at top level ``tok_embeddings``),
    and a column-wise head. The vision tower and projector are not in the plan: their weights stay replicated
    (the recipe's ``tensor_parallel_tower`` shares their images over the TP ranks instead).

    With ``sequence_parallel`` the residual stream between decoder layers is sharded on the sequence (each rank
    holds ``[b, s / tp, d]``): the norms (``sa_norm``, ``mlp_norm``, ``decoder.norm``) run on the local tokens,
    the attention and MLP inputs are all-gathered, and ``output_proj`` / ``w2`` reduce-scatter instead of
    all-reducing (the same bytes on the wire, a ``1 / tp`` of the residual activations kept per rank). The
    embeddings and the image-feature scatter stay replicated (image features land in ``[IMG]`` positions of the
    full sequence); the first decoder layer keeps its rank's slice of them (no communication). The sequence
    length must then be a multiple of the TP degree. It is a training layout: generation refuses it.

    Args:
        loss_parallel (bool): keep the logits sharded on the vocabulary (DTensor ``Shard(-1)``) so the
            cross-entropy never materialises full-vocabulary logits on a rank; the loss and its backward
            must then run under ``torch.distributed.tensor.parallel.loss_parallel()``. False gathers
            the logits (plain replicated tensor). Default is True.
        sequence_parallel (bool): shard the residual stream on the sequence between the tensor-parallel
            blocks (Megatron sequence parallelism; what torch's async TP needs). Default is False.

    Returns:
        Dict[str, ParallelStyle]: the plan, for ``parallelize_module`` or the recipe's ``tensor_parallel_plan``.
    """
    seq = Shard(1) if sequence_parallel else Replicate()
    if loss_parallel:
        head = ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False)
    else:
        head = ColwiseParallel(input_layouts=seq, output_layouts=Replicate())
    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
        "decoder.output": head,
        "decoder.layers.*.attn.q_proj": ColwiseParallel(),
        "decoder.layers.*.attn.k_proj": ColwiseParallel(),
        "decoder.layers.*.attn.v_proj": ColwiseParallel(),
        "decoder.layers.*.attn.output_proj": RowwiseParallel(output_layouts=seq),
        "decoder.layers.*.mlp.w1": ColwiseParallel(),
        "decoder.layers.*.mlp.w3": ColwiseParallel(),
        "decoder.layers.*.mlp.w2": RowwiseParallel(output_layouts=seq),
    }
    if sequence_parallel:
        plan.update({
            # the fused (replicated) hidden state -> this rank's sequence slice: a local slice, no communication
            "decoder.layers.0": ShardSequence(),
            "decoder.layers.*.sa_norm": SequenceParallel(),
            "decoder.layers.*.attn": GatherSequence(),
            "decoder.layers.*.mlp_norm": SequenceParallel(),
            "decoder.layers.*.mlp": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
            ),
            "decoder.norm": SequenceParallel(),
        })
    return plan


def mistral3_pp_stage_extras() -> Dict[str, float]:
    """What stage 0 (embeddings, vision tower, projector) and the last stage (norm, head, loss) weigh.

    In decoder-layer equivalents, for the balanced default split (``first_stage_extra`` and
    ``last_stage_extra`` of ``torchtune_mistral3.training.build_pipeline``).

    Returns:
        Dict[str, float]: ``{"first_stage_extra": ..., "last_stage_extra": ...}``.
    """
    return {"first_stage_extra": _PP_FIRST_STAGE_EXTRA_LAYERS, "last_stage_extra": _PP_LAST_STAGE_EXTRA_LAYERS}
