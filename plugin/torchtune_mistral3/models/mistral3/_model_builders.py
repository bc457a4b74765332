"""Model builders: named sizes of the Mistral 3 family, and the translation of an HF config.json into its arguments.

Named sizes pin dimensions and delegate to :func:`mistral3`; :func:`mistral3_arguments_from_hf_config` turns a
parsed ``Mistral3Config`` into :func:`mistral3` arguments (the builder of a checkpoint directory,
:func:`torchtune_mistral3.checkpointing.mistral3_from_hf_config`, reads the file and the checkpoint's head).
"""

from typing import Any, Dict

from ._component_builders import mistral3
from ._fusion import Mistral3FusionModel

# Shared by every released Mistral 3 model (tekken vocabulary, 256k positions, Pixtral patches, 2x2 merge).
_FAMILY = dict(
    vocab_size=131072,
    max_seq_len=262144,
    norm_eps=1e-5,
    patch_size=14,
    image_size=1540,
    spatial_merge_size=2,
)

# Ministral-3 2512 text RoPE (YaRN over 16k) and its Mistral-Small-3.1 Pixtral tower.
_MINISTRAL3_ROPE = dict(
    rope_base=1e6,
    rope_scaling_factor=16.0,
    rope_original_max_seq_len=16384,
    rope_beta_fast=32.0,
    rope_beta_slow=1.0,
    rope_mscale=1.0,
    rope_mscale_all_dim=1.0,
    llama4_scaling_beta=0.1,
)
_MINISTRAL3_VISION = dict(
    vision_num_layers=24,
    vision_embed_dim=1024,
    vision_num_heads=16,
    vision_intermediate_dim=4096,
)
_MINISTRAL3_ATTENTION = dict(num_heads=32, num_kv_heads=8, head_dim=128)


def mistral3p5_128b(**kwargs: Any) -> Mistral3FusionModel:
    """Mistral Medium 3.5 (``mistralai/Mistral-Medium-3.5-128B``): 88 x 12288 decoder, 48-layer Pixtral; 127.70B.

    The text RoPE values not confirmed for this checkpoint (theta, betas, ``llama_4_scaling_beta``) follow
    Devstral-2-123B, which shares the body; ``mscale_all_dim`` is the corrected 0.0. To train the real
    checkpoint, prefer :func:`mistral3_from_hf_config` on its directory, which reads the shipped values.

    Args:
        **kwargs (Any): overrides of :func:`mistral3` arguments (``max_seq_len``, ``*_trainable`` flags, ...).

    Returns:
        Mistral3FusionModel: the model.
    """
    dims = dict(
        _FAMILY,
        num_layers=88,
        num_heads=96,
        num_kv_heads=8,
        head_dim=128,
        embed_dim=12288,
        intermediate_dim=28672,
        rope_base=1e6,
        rope_scaling_factor=64.0,
        rope_original_max_seq_len=4096,
        rope_beta_fast=4.0,
        rope_beta_slow=1.0,
        rope_mscale=1.0,
        rope_mscale_all_dim=0.0,
        llama4_scaling_beta=0.0,
        vision_num_layers=48,
        vision_embed_dim=1664,
        vision_num_heads=16,
        vision_intermediate_dim=8192,
        tie_word_embeddings=False,
    )
    return mistral3(**{**dims, **kwargs})


def ministral3_3b(**kwargs: Any) -> Mistral3FusionModel:
    """Ministral-3 3B (``mistralai/Ministral-3-3B-Instruct-2512``): 26 x 3072 decoder, tied output head.

    The output head shares the token embedding's weight (torchtune ``TiedLinear``), so the state dict has no
    ``decoder.output.weight`` (HF checkpoints of tied models carry no ``lm_head.weight`` either), and
    ``output_trainable`` must equal ``embeddings_trainable``.

    Args:
        **kwargs (Any): overrides of :func:`mistral3` arguments.

    Returns:
        Mistral3FusionModel: the model.
    """
    dims = dict(
        _FAMILY,
        **_MINISTRAL3_ROPE,
        **_MINISTRAL3_VISION,
        **_MINISTRAL3_ATTENTION,
        num_layers=26,
        embed_dim=3072,
        intermediate_dim=9216,
        tie_word_embeddings=True,
    )
    return mistral3(**{**dims, **kwargs})


def ministral3_8b(**kwargs: Any) -> Mistral3FusionModel:
    """Ministral-3 8B (``mistralai/Ministral-3-8B-Instruct-2512``): 34 x 4096 decoder.

    Args:
        **kwargs (Any): overrides of :func:`mistral3` arguments.

    Returns:
        Mistral3FusionModel: the model.
    """
    dims = dict(
        _FAMILY,
        **_MINISTRAL3_ROPE,
        **_MINISTRAL3_VISION,
        **_MINISTRAL3_ATTENTION,
        num_layers=34,
        embed_dim=4096,
        intermediate_dim=14336,
        tie_word_embeddings=False,
    )
    return mistral3(**{**dims, **kwargs})


def ministral3_14b(**kwargs: Any) -> Mistral3FusionModel:
    """Ministral-3 14B (``mistralai/Ministral-3-14B-Instruct-2512``): 40 x 5120 decoder.

    Args:
        **kwargs (Any): overrides of :func:`mistral3` arguments.

    Returns:
        Mistral3FusionModel: the model.
    """
    dims = dict(
        _FAMILY,
        **_MINISTRAL3_ROPE,
        **_MINISTRAL3_VISION,
        **_MINISTRAL3_ATTENTION,
        num_layers=40,
        embed_dim=5120,
        intermediate_dim=16384,
        tie_word_embeddings=False,
    )
    return mistral3(**{**dims, **kwargs})


def _require(section: Dict[str, Any], key: str, where: str) -> Any:
    if key not in section or section[key] is None:
        raise ValueError(f"{where} has no '{key}'; this builder reads every dimension from the HF config.json")
    return section[key]


def _text_rope_arguments(text: Dict[str, Any], where: str) -> Dict[str, Any]:
    """:func:`mistral3` RoPE arguments from a text config (5.x ``rope_parameters`` or 4.x ``rope_scaling``)."""
    params = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    params.setdefault("rope_theta", text.get("rope_theta"))
    rope_type = params.get("rope_type", params.get("type", "default"))
    base = _require(params, "rope_theta", f"{where} rope_parameters")
    # transformers applies the Llama-4 query scale in ministral3 only (not in the 4.x `mistral` text model).
    beta = float(params.get("llama_4_scaling_beta") or 0.0) if text.get("model_type") == "ministral3" else 0.0
    args: Dict[str, Any] = dict(
        rope_base=float(base),
        rope_scaling_factor=None,
        rope_original_max_seq_len=params.get("original_max_position_embeddings"),
        rope_beta_fast=32.0,
        rope_beta_slow=1.0,
        rope_mscale=None,
        rope_mscale_all_dim=None,
        llama4_scaling_beta=beta,
    )
    if rope_type == "default":
        return args
    if rope_type != "yarn":
        raise ValueError(f"{where}: rope type '{rope_type}' is not supported (expected 'yarn' or 'default')")
    original = _require(params, "original_max_position_embeddings", f"{where} rope_parameters")
    factor = params.get("factor") or _require(text, "max_position_embeddings", where) / original
    args.update(
        rope_scaling_factor=float(factor),
        rope_original_max_seq_len=int(original),
        rope_beta_fast=float(params.get("beta_fast") or 32.0),
        rope_beta_slow=float(params.get("beta_slow") or 1.0),
        rope_mscale=params.get("mscale"),
        rope_mscale_all_dim=params.get("mscale_all_dim"),
        rope_attention_factor=params.get("attention_factor"),
        rope_truncate=bool(params.get("truncate", True)),
    )
    return args


def mistral3_arguments_from_hf_config(config: Dict[str, Any], where: str = "config.json") -> Dict[str, Any]:
    """Translate a transformers ``Mistral3Config`` dict into :func:`mistral3` keyword arguments.

    Args:
        config (Dict[str, Any]): the parsed config.json (top level with ``text_config`` and ``vision_config``).
        where (str): name of the source, used in error messages. Default is "config.json".

    Returns:
        Dict[str, Any]: keyword arguments for :func:`mistral3`.

    Raises:
        ValueError: if a required field is missing or a feature this plugin does not implement is requested.
    """
    text = _require(config, "text_config", where)
    vision = _require(config, "vision_config", where)
    text_where, vision_where = f"{where} text_config", f"{where} vision_config"
    if text.get("sliding_window") is not None:
        raise ValueError(f"{text_where}: sliding_window={text['sliding_window']} is not supported (expected null)")
    if config.get("vision_feature_layer", -1) != -1:
        raise ValueError(f"{where}: vision_feature_layer={config['vision_feature_layer']} is not supported (-1 only)")
    num_heads = _require(text, "num_attention_heads", text_where)
    hidden = _require(text, "hidden_size", text_where)
    vision_rope = vision.get("rope_parameters") or {}
    return dict(
        vocab_size=_require(text, "vocab_size", text_where),
        num_layers=_require(text, "num_hidden_layers", text_where),
        num_heads=num_heads,
        num_kv_heads=text.get("num_key_value_heads") or num_heads,
        head_dim=text.get("head_dim") or hidden // num_heads,
        embed_dim=hidden,
        intermediate_dim=_require(text, "intermediate_size", text_where),
        max_seq_len=_require(text, "max_position_embeddings", text_where),
        norm_eps=float(text.get("rms_norm_eps", 1e-5)),
        hidden_act=text.get("hidden_act", "silu"),
        pad_id=text.get("pad_token_id", 11),
        **_text_rope_arguments(text, text_where),
        vision_num_layers=_require(vision, "num_hidden_layers", vision_where),
        vision_embed_dim=_require(vision, "hidden_size", vision_where),
        vision_num_heads=_require(vision, "num_attention_heads", vision_where),
        vision_intermediate_dim=_require(vision, "intermediate_size", vision_where),
        patch_size=_require(vision, "patch_size", vision_where),
        image_size=_require(vision, "image_size", vision_where),
        vision_num_channels=vision.get("num_channels", 3),
        vision_hidden_act=vision.get("hidden_act", "gelu"),  # PixtralVisionConfig's default
        vision_rope_base=float(vision_rope.get("rope_theta", vision.get("rope_theta", 10000.0))),
        spatial_merge_size=config.get("spatial_merge_size", 2),
        projector_bias=bool(config.get("multimodal_projector_bias", False)),
        projector_hidden_act=config.get("projector_hidden_act", "gelu"),
        image_token_id=config.get("image_token_index", config.get("image_token_id", 10)),
        # transformers 5.x ties by the top-level flag (default True), whatever text_config says; for a
        # checkpoint that also stores a real lm_head, checkpointing.mistral3_from_hf_config unties (as
        # from_pretrained does).
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
    )
