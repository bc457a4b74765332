"""Component builders of the Mistral 3 family, every dimension explicit.

The Ministral-3 text decoder, the Pixtral vision encoder, the projector, and the fused VLM the recipes train.
"""

from typing import Optional

from torch import nn
from torchtune.modules import (
    FeedForward,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)
from torchtune.modules.model_fusion import register_fusion_module

from ._attention import ImageBlockAttention, Mistral3Attention
from ._fusion import Mistral3FusionModel, Mistral3ImageEncoder
from ._position_embeddings import Llama4QueryScale, PixtralRotaryPositionalEmbeddings, YarnRotaryPositionalEmbeddings
from ._projector import Mistral3Projector
from ._rms_norm import Mistral3RMSNorm
from ._vision_encoder import PixtralVisionEncoder

# Pixtral hard-codes its norms' eps (it is not a config field).
PIXTRAL_NORM_EPS = 1e-5

_ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU}


def _activation(name: str, what: str) -> nn.Module:
    """Module for a transformers ``hidden_act`` name (only the exact ones this family uses)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"{what} = '{name}' is not supported; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def _swiglu(dim: int, hidden_dim: int, activation: str, what: str) -> FeedForward:
    return FeedForward(
        gate_proj=nn.Linear(dim, hidden_dim, bias=False),
        down_proj=nn.Linear(hidden_dim, dim, bias=False),
        up_proj=nn.Linear(dim, hidden_dim, bias=False),
        activation=_activation(activation, what),
    )


def ministral3_decoder(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    norm_eps: float,
    rope_base: float,
    rope_scaling_factor: Optional[float],
    rope_original_max_seq_len: Optional[int],
    rope_beta_fast: float = 32.0,
    rope_beta_slow: float = 1.0,
    rope_mscale: Optional[float] = None,
    rope_mscale_all_dim: Optional[float] = None,
    rope_attention_factor: Optional[float] = None,
    rope_truncate: bool = True,
    llama4_scaling_beta: float = 0.0,
    pad_id: Optional[int] = 11,
    hidden_act: str = "silu",
    tie_word_embeddings: bool = False,
) -> TransformerDecoder:
    """Ministral-3 text decoder: GQA with explicit head_dim, YaRN RoPE, Llama-4 query scale, SwiGLU, RMSNorm.

    Args:
        vocab_size (int): vocabulary size.
        num_layers (int): decoder layers.
        num_heads (int): query heads.
        num_kv_heads (int): key/value heads.
        head_dim (int): attention head dimension (need not be ``embed_dim // num_heads``).
        embed_dim (int): hidden size.
        intermediate_dim (int): SwiGLU hidden size.
        max_seq_len (int): longest sequence (sizes the RoPE tables).
        norm_eps (float): RMSNorm eps (``rms_norm_eps``).
        rope_base (float): ``rope_theta``.
        rope_scaling_factor (Optional[float]): YaRN factor; None for plain RoPE.
        rope_original_max_seq_len (Optional[int]): ``original_max_position_embeddings`` (YaRN and the query scale).
        rope_beta_fast (float): YaRN ``beta_fast``. Default is 32.0.
        rope_beta_slow (float): YaRN ``beta_slow``. Default is 1.0.
        rope_mscale (Optional[float]): YaRN ``mscale``. Default is None.
        rope_mscale_all_dim (Optional[float]): YaRN ``mscale_all_dim``. Default is None.
        rope_attention_factor (Optional[float]): explicit YaRN ``attention_factor``. Default is None.
        rope_truncate (bool): YaRN ``truncate``. Default is True.
        llama4_scaling_beta (float): ``llama_4_scaling_beta``; 0 disables the query scale. Default is 0.0.
        pad_id (Optional[int]): padding token id, whose embedding row gets no gradient. Default is 11.
        hidden_act (str): MLP activation (``silu``). Default is "silu".
        tie_word_embeddings (bool): share the output head with the token embeddings. Default is False.

    Returns:
        TransformerDecoder: the decoder (``tok_embeddings``, ``layers``, ``norm``, ``output``).

    Raises:
        ValueError: if ``llama4_scaling_beta`` is non-zero without ``rope_original_max_seq_len``.
    """
    rope = YarnRotaryPositionalEmbeddings(
        dim=head_dim,
        max_seq_len=max_seq_len,
        base=rope_base,
        scaling_factor=rope_scaling_factor,
        original_max_seq_len=rope_original_max_seq_len,
        beta_fast=rope_beta_fast,
        beta_slow=rope_beta_slow,
        mscale=rope_mscale,
        mscale_all_dim=rope_mscale_all_dim,
        attention_factor=rope_attention_factor,
        truncate=rope_truncate,
    )
    query_scale = None
    if llama4_scaling_beta:
        if rope_original_max_seq_len is None:
            raise ValueError("llama_4_scaling_beta needs rope_parameters.original_max_position_embeddings")
        query_scale = Llama4QueryScale(llama4_scaling_beta, rope_original_max_seq_len, max_seq_len)

    layers = nn.ModuleList()
    for _ in range(num_layers):
        attn = Mistral3Attention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            q_proj=nn.Linear(embed_dim, num_heads * head_dim, bias=False),
            k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=False),
            pos_embeddings=rope,
            query_scale=query_scale,
            max_seq_len=max_seq_len,
        )
        layers.append(
            TransformerSelfAttentionLayer(
                attn=attn,
                mlp=_swiglu(embed_dim, intermediate_dim, hidden_act, "text_config.hidden_act"),
                sa_norm=Mistral3RMSNorm(embed_dim, eps=norm_eps),
                mlp_norm=Mistral3RMSNorm(embed_dim, eps=norm_eps),
            )
        )
    tok_embeddings = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
    output = TiedLinear(tok_embeddings) if tie_word_embeddings else nn.Linear(embed_dim, vocab_size, bias=False)
    return TransformerDecoder(
        tok_embeddings=tok_embeddings,
        layers=layers,
        max_seq_len=max_seq_len,
        num_heads=num_heads,
        head_dim=head_dim,
        norm=Mistral3RMSNorm(embed_dim, eps=norm_eps),
        output=output,
    )


def pixtral_vision_encoder(
    *,
    num_layers: int,
    embed_dim: int,
    num_heads: int,
    intermediate_dim: int,
    patch_size: int,
    image_size: int,
    num_channels: int = 3,
    rope_base: float = 10000.0,
    hidden_act: str = "silu",
) -> PixtralVisionEncoder:
    """Pixtral vision encoder (``head_dim = embed_dim // num_heads``, as transformers recomputes it).

    Args:
        num_layers (int): transformer layers.
        embed_dim (int): vision hidden size.
        num_heads (int): attention heads.
        intermediate_dim (int): SwiGLU hidden size.
        patch_size (int): patch side in pixels.
        image_size (int): largest image side in pixels (sizes the 2-D RoPE table).
        num_channels (int): image channels. Default is 3.
        rope_base (float): vision ``rope_theta``. Default is 10000.0.
        hidden_act (str): MLP activation (``silu`` in released checkpoints). Default is "silu".

    Returns:
        PixtralVisionEncoder: the encoder.
    """
    head_dim = embed_dim // num_heads
    max_patches_per_side = image_size // patch_size
    rope = PixtralRotaryPositionalEmbeddings(dim=head_dim, max_patches_per_side=max_patches_per_side, base=rope_base)
    layers = nn.ModuleList()
    for _ in range(num_layers):
        attn = ImageBlockAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_heads,
            head_dim=head_dim,
            q_proj=nn.Linear(embed_dim, embed_dim, bias=False),
            k_proj=nn.Linear(embed_dim, embed_dim, bias=False),
            v_proj=nn.Linear(embed_dim, embed_dim, bias=False),
            output_proj=nn.Linear(embed_dim, embed_dim, bias=False),
            pos_embeddings=rope,
            max_seq_len=max_patches_per_side**2,
        )
        layers.append(
            TransformerSelfAttentionLayer(
                attn=attn,
                mlp=_swiglu(embed_dim, intermediate_dim, hidden_act, "vision_config.hidden_act"),
                sa_norm=Mistral3RMSNorm(embed_dim, eps=PIXTRAL_NORM_EPS),
                mlp_norm=Mistral3RMSNorm(embed_dim, eps=PIXTRAL_NORM_EPS),
            )
        )
    return PixtralVisionEncoder(
        patch_size=patch_size,
        patch_conv=nn.Conv2d(num_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=False),
        ln_pre=Mistral3RMSNorm(embed_dim, eps=PIXTRAL_NORM_EPS),
        layers=layers,
        max_patches_per_side=max_patches_per_side,
    )


def mistral3_projector(
    *,
    vision_dim: int,
    text_dim: int,
    norm_eps: float,
    spatial_merge_size: int = 2,
    bias: bool = False,
    hidden_act: str = "gelu",
) -> Mistral3Projector:
    """Projector from Pixtral features to text embeddings, registered as a fusion module.

    Args:
        vision_dim (int): vision hidden size.
        text_dim (int): text hidden size.
        norm_eps (float): eps of its RMSNorm: the *text* ``rms_norm_eps``.
        spatial_merge_size (int): patch merge block side. Default is 2.
        bias (bool): ``multimodal_projector_bias``. Default is False.
        hidden_act (str): ``projector_hidden_act`` (``gelu`` = exact erf GELU). Default is "gelu".

    Returns:
        Mistral3Projector: the projector; ``fusion_trainable`` (``projector_trainable``) governs its parameters.
    """
    projector = Mistral3Projector(
        norm=Mistral3RMSNorm(vision_dim, eps=norm_eps),
        patch_merger=nn.Linear(vision_dim * spatial_merge_size**2, vision_dim, bias=False),
        linear_1=nn.Linear(vision_dim, text_dim, bias=bias),
        activation=_activation(hidden_act, "projector_hidden_act"),
        linear_2=nn.Linear(text_dim, text_dim, bias=bias),
        spatial_merge_size=spatial_merge_size,
    )
    register_fusion_module(projector)
    return projector


def mistral3(
    *,
    # text decoder
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    norm_eps: float,
    rope_base: float,
    rope_scaling_factor: Optional[float],
    rope_original_max_seq_len: Optional[int],
    rope_beta_fast: float,
    rope_beta_slow: float,
    rope_mscale: Optional[float],
    rope_mscale_all_dim: Optional[float],
    llama4_scaling_beta: float,
    # vision encoder
    vision_num_layers: int,
    vision_embed_dim: int,
    vision_num_heads: int,
    vision_intermediate_dim: int,
    patch_size: int,
    image_size: int,
    # fusion
    spatial_merge_size: int,
    tie_word_embeddings: bool,
    rope_attention_factor: Optional[float] = None,
    rope_truncate: bool = True,
    vision_rope_base: float = 10000.0,
    vision_num_channels: int = 3,
    vision_hidden_act: str = "silu",
    hidden_act: str = "silu",
    projector_bias: bool = False,
    projector_hidden_act: str = "gelu",
    image_token_id: int = 10,
    pad_id: Optional[int] = 11,
    vision_trainable: bool = False,
    projector_trainable: bool = True,
    embeddings_trainable: bool = True,
    output_trainable: bool = True,
    decoder_trainable: bool = True,
) -> Mistral3FusionModel:
    """Mistral 3 VLM: Pixtral encoder + projector early-fused into a Ministral-3 decoder.

    Text arguments are those of :func:`ministral3_decoder`, vision ones those of :func:`pixtral_vision_encoder`
    (prefixed ``vision_``), projector ones those of :func:`mistral3_projector`.

    Args:
        vocab_size (int): vocabulary size.
        num_layers (int): decoder layers.
        num_heads (int): query heads.
        num_kv_heads (int): key/value heads.
        head_dim (int): text attention head dimension.
        embed_dim (int): text hidden size.
        intermediate_dim (int): text SwiGLU hidden size.
        max_seq_len (int): longest token sequence.
        norm_eps (float): text ``rms_norm_eps`` (also the projector norm's eps).
        rope_base (float): text ``rope_theta``.
        rope_scaling_factor (Optional[float]): YaRN factor; None for plain RoPE.
        rope_original_max_seq_len (Optional[int]): ``original_max_position_embeddings``.
        rope_beta_fast (float): YaRN ``beta_fast``.
        rope_beta_slow (float): YaRN ``beta_slow``.
        rope_mscale (Optional[float]): YaRN ``mscale``.
        rope_mscale_all_dim (Optional[float]): YaRN ``mscale_all_dim``.
        llama4_scaling_beta (float): ``llama_4_scaling_beta`` (0 disables the query scale).
        vision_num_layers (int): vision layers.
        vision_embed_dim (int): vision hidden size.
        vision_num_heads (int): vision heads.
        vision_intermediate_dim (int): vision SwiGLU hidden size.
        patch_size (int): vision patch side in pixels.
        image_size (int): largest image side in pixels.
        spatial_merge_size (int): projector patch merge block side.
        tie_word_embeddings (bool): tie the output head to the token embeddings (the top-level HF flag).
        rope_attention_factor (Optional[float]): explicit YaRN ``attention_factor``. Default is None.
        rope_truncate (bool): YaRN ``truncate``. Default is True.
        vision_rope_base (float): vision ``rope_theta``. Default is 10000.0.
        vision_num_channels (int): image channels. Default is 3.
        vision_hidden_act (str): vision MLP activation. Default is "silu".
        hidden_act (str): text MLP activation. Default is "silu".
        projector_bias (bool): ``multimodal_projector_bias``. Default is False.
        projector_hidden_act (str): ``projector_hidden_act``. Default is "gelu".
        image_token_id (int): id of ``[IMG]``. Default is 10.
        pad_id (Optional[int]): padding id (its embedding row gets no gradient). Default is 11.
        vision_trainable (bool): train the vision tower. Default is False.
        projector_trainable (bool): train the projector. Default is True.
        embeddings_trainable (bool): train the token embeddings. Default is True.
        output_trainable (bool): train the output head. Default is True.
        decoder_trainable (bool): train the decoder layers and final norm. Default is True.

    Returns:
        Mistral3FusionModel: the fused model, called as ``model(tokens, encoder_input={"image": {...}})``.
    """
    decoder = ministral3_decoder(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim,
        max_seq_len=max_seq_len,
        norm_eps=norm_eps,
        rope_base=rope_base,
        rope_scaling_factor=rope_scaling_factor,
        rope_original_max_seq_len=rope_original_max_seq_len,
        rope_beta_fast=rope_beta_fast,
        rope_beta_slow=rope_beta_slow,
        rope_mscale=rope_mscale,
        rope_mscale_all_dim=rope_mscale_all_dim,
        rope_attention_factor=rope_attention_factor,
        rope_truncate=rope_truncate,
        llama4_scaling_beta=llama4_scaling_beta,
        pad_id=pad_id,
        hidden_act=hidden_act,
        tie_word_embeddings=tie_word_embeddings,
    )
    vision = pixtral_vision_encoder(
        num_layers=vision_num_layers,
        embed_dim=vision_embed_dim,
        num_heads=vision_num_heads,
        intermediate_dim=vision_intermediate_dim,
        patch_size=patch_size,
        image_size=image_size,
        num_channels=vision_num_channels,
        rope_base=vision_rope_base,
        hidden_act=vision_hidden_act,
    )
    projector = mistral3_projector(
        vision_dim=vision_embed_dim,
        text_dim=embed_dim,
        norm_eps=norm_eps,
        spatial_merge_size=spatial_merge_size,
        bias=projector_bias,
        hidden_act=projector_hidden_act,
    )
    return Mistral3FusionModel(
        decoder,
        Mistral3ImageEncoder(vision, projector),
        image_token_id,
        vision_trainable=vision_trainable,
        projector_trainable=projector_trainable,
        embeddings_trainable=embeddings_trainable,
        output_trainable=output_trainable,
        decoder_trainable=decoder_trainable,
    )
