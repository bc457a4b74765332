"""Per-block ``torch.compile`` that works under tensor parallelism.

torchtune's ``training.compile_model`` compiles every ``TransformerSelfAttentionLayer`` of an
``EarlyFusionModel``: the decoder's and the Pixtral tower's. Both run the same ``forward`` code object, and
dynamo keeps its "automatic dynamic shapes" state per code object, so the decoder blocks are recompiled with a
symbolic sequence length at the first step (tower shape first, decoder shape next), and again whenever the
padded batch length changes. A tensor-parallel block (DTensor weights) with a symbolic sequence length fails
in AOTAutograd's backward trace on torch 2.13 (``RecursionError`` in ``proxy_tensor._compute_proxy``: the
proxy of the sequence-length SymInt resolves to a ``sym_max(s, 1)`` node that needs itself; the same happens
for a stock torchtune llama3 block, so it is not this model's code). Under TP the decoder blocks are therefore
compiled with static shapes, and the recipe pads every batch to ``tokenizer.max_seq_len`` (one shape, one
compile), as it does under pipeline parallelism.
"""

import os

import torch._functorch.config
import torch._inductor.config
from torch import nn
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.utils import get_logger

log = get_logger("INFO")


def compile_blocks(model: nn.Module, *, static_decoder_shapes: bool, verbose: bool = True) -> int:
    """Compile each transformer block of ``model`` (a model or pipeline stage) in place, torchtitan's way.

    Call it after tensor parallelism and activation checkpointing and before FSDP2 (torchtitan's order). A block
    that activation checkpointing wrapped is compiled inside its wrapper, as torchtune's ``compile_model`` leaves
    it: compiling the wrapper itself (torchtitan) fails at the first forward on torch 2.13 under TP
    (``AssertionError: expected all tensors_saved_with_vc_check to be Tensors``). Decoder blocks
    (``decoder.layers.*``) get ``dynamic=False`` when ``static_decoder_shapes``; vision-tower blocks keep
    dynamo's default, as their patch counts change with the images and their weights stay plain tensors
    (replicated) under TP.

    Args:
        model (nn.Module): the model or one pipeline stage.
        static_decoder_shapes (bool): compile the decoder blocks for one fixed shape (needed under TP).
        verbose (bool): log what is compiled. Default is True.

    Returns:
        int: the number of blocks compiled.
    """
    backend = os.environ.get("TORCH_COMPILE_BACKEND", "inductor")
    if static_decoder_shapes:
        # Under TP a graph's collectives name their process group; inductor's FX-graph and AOT-autograd caches
        # reuse a graph compiled by an earlier run whose group had another name (torch 2.13, compiled TP2 x PP2
        # after TP2: "Could not resolve the process group registered under the name 7"). Compile afresh.
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
    # the blocks themselves: inside an activation-checkpointing wrapper, ``<name>._checkpoint_wrapped_module``
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, TransformerSelfAttentionLayer)]
    for name, module in blocks:
        decoder = name.startswith("decoder.layers.")
        module.compile(backend=backend, dynamic=False if decoder and static_decoder_shapes else None)
    if verbose:
        static = " (decoder blocks with static shapes)" if static_decoder_shapes else ""
        log.info(f"Compiled {len(blocks)} transformer blocks with torch.compile{static}")
    return len(blocks)


def needs_static_shapes(compile: bool, tensor_parallel: bool) -> bool:
    """Whether every batch must be padded to one length: compiled tensor-parallel blocks have static shapes.

    Args:
        compile (bool): the config's ``compile``.
        tensor_parallel (bool): ``tensor_parallel_dim > 1``.

    Returns:
        bool: True when both are on.
    """
    return bool(compile) and bool(tensor_parallel)
