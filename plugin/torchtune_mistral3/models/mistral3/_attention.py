"""The two attention variants of Mistral 3, as :class:`~torchtune.modules.MultiHeadAttention` subclasses.

Staying ``MultiHeadAttention`` instances keeps torchtune's machinery working on them unchanged:
``training.prepare_mha_for_tp`` rescales their head counts, the layers around them are stock
``TransformerSelfAttentionLayer`` s (activation checkpointing, FSDP2 per ``layers.N``), and the weights keep
the ``attn.{q,k,v,output}_proj`` names.
"""

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torchtune.modules import KVCache, MultiHeadAttention

try:  # torch >= 2.9: variable-length flash attention (CUDA)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch: the dense-mask path everywhere
    varlen_attn = None

_compiled_flex_attention = None


# FlexAttention's block-causal backward runs one program per (sample, KV head, KV block of 128 keys); below this
# many programs SDPA with the dense mask is faster on the H200 (``bench/packing.py --attention-only``, one layer's
# attention forward + backward over the 18-pack mix, ``bench/results/packing_attention_*_h200.json``): 16 and 32
# programs (TP 8 shards, 1 and 2 packs per micro-batch) SDPA 1.44x and 1.16x faster; 48 (3 packs) and 96 flex 1.33x
# and 1.72x; 128 (TP 1, 1 pack) flex 2.2x. The threshold lies between the measured 32 and 48.
FLEX_MIN_BACKWARD_PROGRAMS = 40


def packed_attention_prefers_flex(batch: int, kv_heads: int, seq_len: int, block_size: int = 128) -> bool:
    """Whether FlexAttention (else SDPA with a dense boolean mask) should run block-causal attention on CUDA.

    Args:
        batch (int): packs per micro-batch (what one attention call sees).
        kv_heads (int): KV heads per tensor-parallel rank.
        seq_len (int): tokens per pack.
        block_size (int): the BlockMask's block. Default is 128.

    Returns:
        bool: True when flex's backward has at least ``FLEX_MIN_BACKWARD_PROGRAMS`` programs.
    """
    return batch * kv_heads * math.ceil(seq_len / block_size) >= FLEX_MIN_BACKWARD_PROGRAMS


def block_causal_mask(document_ids: torch.Tensor, flex: Optional[bool] = None) -> Union[BlockMask, torch.Tensor]:
    """The block-causal document mask of packed sequences: a token attends to earlier tokens of its own sample.

    On CUDA a FlexAttention :class:`~torch.nn.attention.flex_attention.BlockMask` (compressed, no ``s x s``
    tensor; blocks outside every sample are skipped by the kernel), unless ``flex`` is False (see
    :func:`packed_attention_prefers_flex`). Elsewhere a dense boolean mask, because torch's FlexAttention has no
    backward on the CPU; :class:`Mistral3Attention` gives both the same meaning.

    Args:
        document_ids (torch.Tensor): sample index of every token within its pack, shape ``[b, s]``, on the device
            the model runs on (see :func:`~torchtune_mistral3.data.padded_collate_packed_mistral3`).
        flex (Optional[bool]): False for the dense mask on CUDA too. Default is None (flex on CUDA).

    Returns:
        Union[BlockMask, torch.Tensor]: a BlockMask of shape ``[b, 1, s, s]`` on CUDA, else a boolean tensor
        ``[b, s, s]`` (True attends).
    """
    if document_ids.device.type == "cuda" and flex is not False:
        return flex_block_causal_mask(document_ids)
    s = document_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    return causal & (document_ids[:, :, None] == document_ids[:, None, :])


def flex_block_causal_mask(document_ids: torch.Tensor, block_size: int = 128) -> BlockMask:
    """The block-causal document mask as a FlexAttention BlockMask on ``document_ids``' device (any device).

    Args:
        document_ids (torch.Tensor): sample index of every token within its pack, shape ``[b, s]``.
        block_size (int): tokens per mask block. Default is 128 (torch's).

    Returns:
        BlockMask: ``[b, 1, s, s]``; query ``i`` attends key ``j`` iff ``j <= i`` and both are in one sample.
    """
    b, s = document_ids.shape

    def mask_mod(batch, head, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (document_ids[batch, q_idx] == document_ids[batch, kv_idx])

    return create_block_mask(mask_mod, b, None, s, s, device=document_ids.device, BLOCK_SIZE=block_size)


@torch.compiler.disable(recursive=False)
def _flex_attention_gqa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, kernel_options: Optional[dict] = None
) -> torch.Tensor:
    """FlexAttention with grouped KV heads read in place, compiled once (eager flex is a slow reference only).

    ``kernel_options`` None keeps torch's own choice: none of the options ``bench/packing.py --flex-sweep`` tried
    on an H200 beat it by more than 2.5% (docs/performance.md, 3a.1).
    """
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention(
        q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1], kernel_options=kernel_options
    )


def _positions_2d(input_pos: Optional[torch.Tensor], b: int, s: int) -> Optional[torch.Tensor]:
    """``input_pos`` as ``[b, s]``.

    torchtune's generate passes ``[s]`` (prefill of one prompt) or ``[b]`` (one decode step of a batch), which
    would broadcast wrongly against ``[b, s, n_h, h_d]`` queries.
    """
    if input_pos is None or input_pos.dim() == 2:
        return input_pos
    return input_pos.view(b, s) if input_pos.numel() == b * s else input_pos.view(1, s)


class _KVCache(KVCache):
    """torchtune's :class:`~torchtune.modules.KVCache` whose ``update`` reads no device value back to the host.

    The stock ``update`` asserts ``cache_pos[0] + s <= max_seq_len`` on a device tensor: a device-to-host sync in
    every layer at every eager decode step, which drains the GPU's launch queue. Without it, writing past the end
    still fails (the write's index is out of range), and the plugin's generate checks the length once per call.
    """

    def update(self, k_val: torch.Tensor, v_val: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write ``k_val``/``v_val`` ``[b, n_kv, s, h_d]`` at the next ``s`` cache positions; return the caches.

        Args:
            k_val (torch.Tensor): new keys.
            v_val (torch.Tensor): new values.

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: the key and value caches ``[b, n_kv, s_cache, h_d]``.

        Raises:
            ValueError: if the batch is larger than the caches'.
        """
        if k_val.shape[0] > self.k_cache.shape[0]:
            raise ValueError(
                f"the KV cache is set up for batch {self.k_cache.shape[0]}, got keys of batch {k_val.shape[0]}"
            )
        positions = self.cache_pos[: k_val.shape[2]]
        self.k_cache[:, :, positions] = k_val
        self.v_cache[:, :, positions] = v_val
        self.cache_pos.add_(k_val.shape[2])
        return self.k_cache, self.v_cache


class Mistral3Attention(MultiHeadAttention):
    """torchtune attention with an optional per-position query scale after RoPE (Ministral-3 text attention).

    Same arguments as :class:`~torchtune.modules.MultiHeadAttention`, plus ``query_scale``. The stock forward
    offers no place to apply a position-dependent factor to queries only, so this class re-states it with that
    one step added; the key/value path, KV-cache handling and the attention call are torchtune's. Head counts are
    explicit in reshapes (never ``-1``), so an empty sequence (a batch without images) passes through.

    Args:
        query_scale (Optional[nn.Module]): called as ``query_scale(q, input_pos=input_pos)`` on rotated queries
            of shape ``[b, s, n_h, h_d]``, e.g. :class:`Llama4QueryScale`. None skips it. Default is None.
        **kwargs: keyword arguments of :class:`~torchtune.modules.MultiHeadAttention`.
    """

    def __init__(self, *, query_scale: Optional[nn.Module] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.query_scale = query_scale

    def setup_cache(self, batch_size: int, dtype: torch.dtype, max_seq_len: int) -> None:
        """As torchtune's ``setup_cache``, with a KV cache whose updates never sync the host with the device.

        Args:
            batch_size (int): batch size of the cache.
            dtype (torch.dtype): dtype of the cache.
            max_seq_len (int): cache length.
        """
        if self.kv_cache is not None:
            super().setup_cache(batch_size, dtype, max_seq_len)  # torchtune's warning; the cache stays
            return
        self.kv_cache = _KVCache(
            batch_size=batch_size,
            max_seq_len=max_seq_len,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=dtype,
        )
        self.cache_enabled = True

    def forward(
        self,
        x: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        *,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attend from ``x`` to ``y`` (self-attention: ``y is x``).

        Args:
            x (torch.Tensor): query input, shape ``[b, s_x, d]``.
            y (Optional[torch.Tensor]): key/value input, shape ``[b, s_y, d]``; None only while decoding from a
                KV cache. Default is None.
            mask (Optional[torch.Tensor]): boolean ``[b, s_x, s_y]`` mask (True attends) or a flex ``BlockMask``
                (:func:`block_causal_mask` of packed sequences); None means causal, computed inside SDPA without
                materialising a mask. Neither expands the KV heads without a KV cache, nor when decoding one token
                per sample from it. Default is None.
            input_pos (Optional[torch.Tensor]): positions ``[b, s_x]``; None means ``0..s_x-1``. Default is None.

        Returns:
            torch.Tensor: shape ``[b, s_x, d]``.

        Raises:
            ValueError: if ``y`` is None and no KV cache is enabled.

        Notation used for tensor shapes:
            - b: batch size
            - s_x, s_y: query and key sequence lengths
            - d: embed dim
            - n_h, n_kv: query and key/value heads
            - h_d: head dim
        """
        b, s_x, _ = x.shape
        input_pos = _positions_2d(input_pos, b, s_x)
        # q: [b, s_x, n_h, h_d]
        q = self.q_proj(x).view(b, s_x, self.num_heads, self.head_dim)
        if self.pos_embeddings is not None:
            q = self.pos_embeddings(q, input_pos=input_pos)
        if self.query_scale is not None:
            q = self.query_scale(q, input_pos=input_pos)
        q = q.transpose(1, 2)

        if y is None:
            if self.kv_cache is None or not self.cache_enabled:
                raise ValueError("Must provide y input or use kv_cache to enable streaming decoding")
            k, v = self.kv_cache.k_cache, self.kv_cache.v_cache
        else:
            s_y = y.shape[1]
            # k, v: [b, s_y, n_kv, h_d]
            k = self.k_proj(y).view(b, s_y, self.num_kv_heads, self.head_dim)
            v = self.v_proj(y).view(b, s_y, self.num_kv_heads, self.head_dim)
            if self.pos_embeddings is not None:
                k = self.pos_embeddings(k, input_pos=input_pos)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            if self.kv_cache is not None and self.cache_enabled:
                k, v = self.kv_cache.update(k, v)

        dropout_p = self.attn_dropout if self.training else 0.0
        gqa = self.num_heads != self.num_kv_heads
        if isinstance(mask, BlockMask):
            # Packed sequences on CUDA: the block-causal document mask, KV heads shared in place.
            if dropout_p > 0.0:
                raise ValueError("packed sequences (FlexAttention) do not support attention dropout; set it to 0")
            output = _flex_attention_gqa(q, k, v, mask)
        elif self.kv_cache is None and (gqa or mask is not None) and self.is_causal:
            # Training batches, plain causal or with a boolean (packed) mask: SDPA reads the shared KV heads
            # itself, so no n_h/n_kv-fold copies of k and v are made and kept for backward (measured on H200:
            # same output, less memory and time).
            output = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=None if mask is None else mask[:, None],
                dropout_p=dropout_p,
                is_causal=mask is None,
                enable_gqa=gqa,
            )
        elif self.kv_cache is not None and self.cache_enabled and s_x == 1:
            # Decoding one token per sample from the cache: the n_h / n_kv query heads that share a KV head
            # become that head's query rows, [b, n_h, 1, h_d] -> [b, n_kv, n_h / n_kv, h_d] (a view), so SDPA
            # reads the cached keys and values in place (no n_h / n_kv-fold copy of the cache per step) with
            # plain equal-head shapes that every backend takes with a mask. (enable_gqa=True with a mask is
            # taken by the CPU kernels but not by CUDA's memory-efficient kernel in every torch release; SDPA
            # then falls back to its math path, which repeats the KV heads itself.)
            output = F.scaled_dot_product_attention(
                q.reshape(b, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim),
                k,
                v,
                attn_mask=None if mask is None else mask[:, None],  # [b, 1, 1, s_y]: one row for all heads
                dropout_p=dropout_p,
            ).reshape(b, self.num_heads, 1, self.head_dim)
        else:
            if self.num_heads != self.num_kv_heads:
                # Prefill into a KV cache: torchtune's path with expanded heads (one copy per layer per call).
                q_per_kv = self.num_heads // self.num_kv_heads
                expand_shape = (b, self.num_kv_heads, q_per_kv, -1, self.head_dim)
                k = k.unsqueeze(2).expand(expand_shape).flatten(1, 2)
                v = v.unsqueeze(2).expand(expand_shape).flatten(1, 2)
            output = self._attention_call(
                q,
                k,
                v,
                mask=mask,
                dropout_p=dropout_p,
                is_causal=self.kv_cache is None and mask is None and self.is_causal,
            )
        # [b, n_h, s_x, h_d] -> [b, s_x, n_h * h_d]
        output = output.transpose(1, 2).reshape(b, s_x, self.num_heads * self.head_dim)
        return self.output_proj(output)


def _attend_within_images(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    dropout_p: float,
    is_causal: bool,
) -> torch.Tensor:
    """Block-diagonal attention over the patches of images packed in one sequence: ONE call over all of them.

    ``mask`` holds the patch offsets of the images, ``[0, p_0, p_0 + p_1, ..., p]`` (a tensor of ``n + 1``
    values, like varlen attention's ``cu_seqlens``). No guard of a compiled block depends on the image sizes or
    count: the call sees tensors only, so a compiled tower block with a symbolic patch count serves every batch.
    On CUDA in bf16/fp16 it is torch's variable-length flash attention (no mask tensor; ``max`` is the whole
    sequence, an upper bound the kernel only uses to size its grid), else SDPA with the dense ``[p, p]``
    block-diagonal boolean mask built from the offsets (CPU, fp32 parity runs).
    """
    # q, k, v: [1, n_h, p, h_d]
    p = q.shape[2]
    if p == 0:
        # No image (the encoder still runs so data-parallel ranks issue the same collectives).
        return v
    half = q.dtype in (torch.float16, torch.bfloat16)
    if varlen_attn is not None and q.device.type == "cuda" and half and not dropout_p:
        offsets = mask.to(torch.int32)
        # [1, n_h, p, h_d] -> [p, n_h, h_d]
        out = varlen_attn(*(t[0].transpose(0, 1) for t in (q, k, v)), offsets, offsets, p, p)
        return out.transpose(0, 1).unsqueeze(0)
    # image of every patch (1-based): [p]; the block-diagonal mask [p, p] (True attends). ``mask`` is not sliced:
    # a slice of n values would make dynamo specialise n = 1 (one image) apart from n > 1.
    image = torch.searchsorted(mask, torch.arange(p, device=q.device, dtype=mask.dtype), right=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=image[:, None] == image[None, :], dropout_p=dropout_p)


def image_patch_offsets(patches_per_image: Sequence[int], device: torch.device) -> torch.Tensor:
    """The ``mask`` of :class:`ImageBlockAttention`: patch offsets ``[0, p_0, p_0 + p_1, ..., p]`` of packed images.

    Args:
        patches_per_image (Sequence[int]): patches of each image, in sequence order.
        device (torch.device): where the attention runs.

    Returns:
        torch.Tensor: LongTensor ``[n + 1]`` on ``device``.
    """
    counts = torch.tensor([0, *patches_per_image], dtype=torch.long)
    return counts.cumsum(0).to(device, non_blocking=True)


class ImageBlockAttention(Mistral3Attention):
    """Non-causal attention over the patches of several images packed into one sequence (Pixtral attention).

    Each patch attends only to patches of its own image: ``mask`` is the tensor of the images' patch offsets
    (:func:`image_patch_offsets`), and all images are attended in one call (see :func:`_attend_within_images`).

    Args:
        **kwargs: keyword arguments of :class:`~torchtune.modules.MultiHeadAttention`; ``is_causal`` is forced to
            False.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**{**kwargs, "is_causal": False})
        self._attention_call = _attend_within_images
