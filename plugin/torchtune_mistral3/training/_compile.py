"""Per-block ``torch.compile`` with no recompile after warm-up, also under tensor parallelism.

Why each choice (dynamo's ``TORCH_LOGS=recompiles`` named every cause on a GPU run of varied MedPix data):

- **The tower's blocks and the decoder's are compiled apart.** Both are torchtune ``TransformerSelfAttentionLayer``
  s. Compiled with ``module.compile()`` they run one code object (``TransformerSelfAttentionLayer.forward``), and
  dynamo keeps its cache and its "automatic dynamic shapes" state per code object: the frozen tower and the
  trained decoder ping-ponged on ``requires_grad`` guards, and the tower's shapes made the decoder's sequence
  length symbolic at its first call. Each kind here is compiled through its own small function
  (:func:`_tower_block`, :func:`_decoder_block`), so each has its own code object, cache and shape state.
- **The tower's blocks have dynamic shapes from the first call** (``dynamic=True``): their sequence is all the
  patches of a batch's images, which change with every batch, and their attention takes the images' patch
  offsets as a tensor (``ImageBlockAttention``), so no guard depends on an image's size or the image count.
- **The decoder's blocks**: without TP they are compiled with dynamic shapes from the first call, so a padded
  batch of any length reuses one graph; packs (always ``tokenizer.max_seq_len`` tokens) give one shape
  anyway. Under TP they are compiled with static shapes, and the collate pads every batch to
  ``tokenizer.max_seq_len`` (one shape, one compile), as under pipeline parallelism: a tensor-parallel block
  (DTensor weights) with a symbolic sequence length fails in AOTAutograd's backward trace on torch 2.13
  (``RecursionError`` in ``proxy_tensor._compute_proxy``: the proxy of the sequence-length SymInt resolves to a
  ``sym_max(s, 1)`` node that needs itself; the same happens for a stock torchtune llama3 block, so it is not
  this model's code).
- **Inductor's size tests**: with dynamic shapes inductor still guards a few kernel choices on the sizes; the
  one seen on a GPU (the fused RMSNorm-backward reductions, ``3072*x.size()[1]*x.size()[0] >= 5242880``) is
  switched to its size-independent mode for the dynamic blocks (``_DYNAMIC_INDUCTOR_OPTIONS``). On CPU inductor
  added no guard after warm-up on the demo (docs/performance.md, section 3b).
- **The loss** (:func:`compile_loss`): torchtune's ``compile_loss`` compiles the chunked cross-entropy with
  dynamo's defaults, so the first new label count recompiles it; here it is dynamic from the first call too,
  static where the batches are (TP).
"""

import os
import types
from typing import Any, Optional

import torch
import torch._functorch.config
import torch._inductor.config
from torch import nn
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.utils import get_logger

log = get_logger("INFO")


def _tower_block(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A vision-tower block's forward: the code object that dynamo caches the tower's graphs under."""
    return type(block).forward(block, *args, **kwargs)


def _decoder_block(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A decoder block's forward: the code object that dynamo caches the decoder's graphs under."""
    return type(block).forward(block, *args, **kwargs)


# Inductor options for blocks with dynamic shapes. On CUDA inductor fuses an RMSNorm backward's two reductions
# (rows and columns, "mix-order reduction") only when ``rows * cols >= 5 * 2**20``, ``rows >= 2 * cols`` and
# ``rows >= 4096``; with a symbolic row count (tokens) each test is a guard, and a batch on the other side of one
# recompiles (the GPU run's ``3072*x.size()[1]*x.size()[0] >= 5242880``). Non-strict mode skips these three
# size tests (torch's "non-critical checks"), so the choice, and the graph, is the same for every length.
_DYNAMIC_INDUCTOR_OPTIONS = {"triton.mix_order_reduction_non_strict_mode": True}


def _compile_block(block: nn.Module, forward: Any, backend: str, dynamic: Optional[bool]) -> None:
    """Replace ``block.forward`` (on the instance) by ``forward`` compiled; hooks and wrappers stay eager."""
    options = _DYNAMIC_INDUCTOR_OPTIONS if dynamic and backend == "inductor" else None
    compiled = torch.compile(forward, backend=backend, dynamic=dynamic, options=options)
    block.forward = types.MethodType(compiled, block)


def compile_blocks(model: nn.Module, *, static_decoder_shapes: bool, verbose: bool = True) -> int:
    """Compile each transformer block of ``model`` (a model or pipeline stage) in place, torchtitan's way.

    Call it after tensor parallelism and activation checkpointing and before FSDP2 (torchtitan's order). A block
    that activation checkpointing wrapped is compiled inside its wrapper, as torchtune's ``compile_model`` leaves
    it: compiling the wrapper itself (torchtitan) fails at the first forward on torch 2.13 under TP
    (``AssertionError: expected all tensors_saved_with_vc_check to be Tensors``). Decoder blocks
    (``decoder.layers.*``) get static shapes when ``static_decoder_shapes``, else dynamic ones; vision-tower
    blocks always dynamic ones (their weights stay plain tensors, replicated, under TP). See the module
    docstring for why.

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
        if name.startswith("decoder.layers."):
            _compile_block(module, _decoder_block, backend, dynamic=not static_decoder_shapes)
        else:
            _compile_block(module, _tower_block, backend, dynamic=True)
    if verbose:
        decoder = "static" if static_decoder_shapes else "dynamic"
        log.info(f"Compiled {len(blocks)} transformer blocks with torch.compile (decoder blocks with {decoder} shapes)")
    return len(blocks)


def compile_loss(loss: nn.Module, *, static_shapes: bool, verbose: bool = True) -> nn.Module:
    """Compile a chunked cross-entropy's per-chunk ``compute_cross_entropy`` (torchtune's choice), in place.

    Unlike torchtune's ``training.compile_loss``, shapes are dynamic from the first call unless ``static_shapes``
    (a chunk's length follows the batch's): one graph for every length. The recipe's collate pads batches to a
    multiple of ``num_output_chunks`` under ``compile``, so no chunk is one token wide (a size dynamo would
    specialise: one more graph). A loss without ``compute_cross_entropy`` (``torch.nn.CrossEntropyLoss``,
    computed by the recipe's ``PipelineLoss``) stays eager, as the recipe ran it before.

    Args:
        loss (nn.Module): the config's loss.
        static_shapes (bool): every batch has one shape (compiled tensor-parallel blocks).
        verbose (bool): log it. Default is True.

    Returns:
        nn.Module: ``loss``.
    """
    if not hasattr(loss, "compute_cross_entropy"):
        return loss
    backend = os.environ.get("TORCH_COMPILE_BACKEND", "inductor")
    loss.compute_cross_entropy = torch.compile(loss.compute_cross_entropy, backend=backend, dynamic=not static_shapes)
    if verbose:
        log.info(f"Compiled the loss's cross-entropy with torch.compile ({'static' if static_shapes else 'dynamic'} "
                 "shapes)")
    return loss


def needs_static_shapes(compile: bool, tensor_parallel: bool) -> bool:
    """Whether every batch must be padded to one length: compiled tensor-parallel blocks have static shapes.

    Args:
        compile (bool): the config's ``compile``.
        tensor_parallel (bool): ``tensor_parallel_dim > 1``.

    Returns:
        bool: True when both are on.
    """
    return bool(compile) and bool(tensor_parallel)
