"""LoRA builders of the Mistral 3 family, on torchtune's LoRA modules and with its LoRA arguments.

Each builder makes the base model with :func:`mistral3` and swaps the chosen linears for
:class:`~torchtune.modules.peft.LoRALinear` (or, with ``fp8_base=True``, for
:class:`~torchtune_mistral3.peft.FP8LoRALinear`, whose frozen base stays in the checkpoint's FP8). State dict
keys of the base are unchanged (``...q_proj.weight``); the adapters add ``...q_proj.lora_a.weight`` and
``...q_proj.lora_b.weight``. Which parts train follows torchtune's Llama-3.2-Vision LoRA builders:
``decoder_trainable``, ``vision_trainable`` and ``projector_trainable`` are each ``"lora"``, ``"frozen"`` or
``"full"``; by default only the decoder gets adapters, and the vision tower and projector are frozen. The
token embeddings and (unless ``apply_lora_to_output``) the output head stay frozen.
"""

from typing import Any, Callable, Iterator, List, Literal, Tuple

from torch import nn
from torchtune.modules.peft import LoRALinear, get_adapter_params, set_trainable_params

from torchtune_mistral3.peft._fp8_lora import FP8_MATMULS, FP8LoRALinear, FrozenFP8Linear

from ._component_builders import mistral3
from ._fusion import Mistral3FusionModel
from ._model_builders import ministral3_3b, ministral3_8b, ministral3_14b, mistral3p5_128b

LORA_ATTN_MODULES = Literal["q_proj", "k_proj", "v_proj", "output_proj"]
TRAINABLE = ("lora", "frozen", "full")
_ATTN = ("q_proj", "k_proj", "v_proj", "output_proj")
_MLP = ("w1", "w2", "w3")
_PROJECTOR = ("patch_merger", "linear_1", "linear_2")


def _check_trainable(name: str, value: str) -> None:
    if value not in TRAINABLE:
        raise ValueError(f"{name}='{value}' is not one of {list(TRAINABLE)}")


def _layer_linears(layers: nn.ModuleList, attn: List[str], mlp: bool) -> Iterator[Tuple[nn.Module, str, bool]]:
    """Yield ``(parent, attribute, gets_lora)`` for every linear of the transformer layers."""
    for layer in layers:
        for name in _ATTN:
            yield layer.attn, name, name in attn
        for name in _MLP:
            yield layer.mlp, name, mlp


def _swap(
    parent: nn.Module, name: str, lora: bool, fp8: bool, rank: int, alpha: float, dropout: float, matmul: str
) -> None:
    """Replace ``parent.<name>`` (an ``nn.Linear``) by its LoRA or frozen-FP8 version, keeping its key names."""
    old = getattr(parent, name)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"{type(parent).__name__}.{name} is a {type(old).__name__}, not an nn.Linear")
    bias = old.bias is not None
    if fp8 and bias:
        raise ValueError(f"fp8_base: {type(parent).__name__}.{name} has a bias; FP8 bases are bias-free linears")
    if lora and fp8:
        new = FP8LoRALinear(old.in_features, old.out_features, rank=rank, alpha=alpha, dropout=dropout, matmul=matmul)
    elif lora:
        new = LoRALinear(old.in_features, old.out_features, rank=rank, alpha=alpha, dropout=dropout, use_bias=bias)
        new.weight = old.weight
        if bias:
            new.bias = old.bias
    elif fp8:
        new = FrozenFP8Linear(old.in_features, old.out_features, matmul=matmul)
    else:
        return
    setattr(parent, name, new)


def _build_lora(
    builder: Callable[..., Mistral3FusionModel],
    *,
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    decoder_trainable: str = "lora",
    vision_trainable: str = "frozen",
    projector_trainable: str = "frozen",
    fp8_base: bool = False,
    fp8_matmul: str = "dequantize",
    **model_kwargs: Any,
) -> Mistral3FusionModel:
    """``builder(**model_kwargs)`` (a model builder of this family) with LoRA adapters.

    Args:
        builder (Callable[..., Mistral3FusionModel]): :func:`mistral3` or a named-size builder.
        lora_attn_modules (List[LORA_ATTN_MODULES]): attention projections that get adapters, any of
            ``q_proj``, ``k_proj``, ``v_proj``, ``output_proj`` (in every ``"lora"`` part).
        apply_lora_to_mlp (bool): adapters on the MLP projections (``w1``, ``w2``, ``w3``) too. Default is False.
        apply_lora_to_output (bool): an adapter on the output head (``lm_head``); not possible with tied
            embeddings. Default is False.
        lora_rank (int): rank of every adapter. Default is 8.
        lora_alpha (float): scaling numerator (the update is ``alpha / rank * B A x``). Default is 16.0.
        lora_dropout (float): dropout before the adapters. Default is 0.0.
        decoder_trainable (str): the text decoder layers: ``"lora"``, ``"frozen"`` or ``"full"`` (final norm
            included for ``"full"``). Default is "lora".
        vision_trainable (str): the Pixtral tower, same choices. Default is "frozen".
        projector_trainable (str): the projector (its adapters go on ``patch_merger``, ``linear_1``,
            ``linear_2``), same choices. Default is "frozen".
        fp8_base (bool): keep the frozen decoder-layer linears as the checkpoint's per-tensor FP8 bytes (the
            checkpoint must store them in FP8, as Mistral's do); False keeps them in the compute dtype.
            Default is False.
        fp8_matmul (str): the FP8 base's matmul: ``"dequantize"`` (exact w.r.t. the dequantised base) or
            ``"scaled_mm"`` (input quantised per tensor, ``torch._scaled_mm``; 1.31x faster on one H200, its loss
            falling about half as fast: docs/lora.md).
            Default is "dequantize".
        **model_kwargs (Any): ``builder`` arguments (dimensions; the ``*_trainable`` flags are set here).

    Returns:
        Mistral3FusionModel: the model; only adapter parameters (and ``"full"`` parts) have ``requires_grad``.

    Raises:
        ValueError: for an unknown attention module or trainable choice, or ``apply_lora_to_output`` with tied
            embeddings.
    """
    for name, value in (
        ("decoder_trainable", decoder_trainable),
        ("vision_trainable", vision_trainable),
        ("projector_trainable", projector_trainable),
    ):
        _check_trainable(name, value)
    unknown = sorted(set(lora_attn_modules) - set(_ATTN))
    if unknown:
        raise ValueError(f"lora_attn_modules has {unknown}; expected a subset of {list(_ATTN)}")
    clashing = sorted({"vision_trainable", "projector_trainable", "decoder_trainable"} & set(model_kwargs))
    clashing += sorted({"embeddings_trainable", "output_trainable"} & set(model_kwargs))
    if clashing:
        raise ValueError(f"{clashing} are set by the LoRA builder's own arguments; remove them")
    model = builder(
        **model_kwargs,
        vision_trainable=vision_trainable == "full",
        projector_trainable=projector_trainable == "full",
        decoder_trainable=decoder_trainable == "full",
        embeddings_trainable=False,
        output_trainable=False,
    )
    if apply_lora_to_output and not isinstance(model.decoder.output, nn.Linear):
        raise ValueError("apply_lora_to_output=True needs an untied output head, but tie_word_embeddings is true")
    fully_trained = {n for n, p in model.named_parameters() if p.requires_grad}
    if fp8_matmul not in FP8_MATMULS:
        raise ValueError(f"fp8_matmul='{fp8_matmul}' is not one of {list(FP8_MATMULS)}")
    adapter = dict(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, matmul=fp8_matmul)
    decoder_lora = decoder_trainable == "lora"
    for parent, name, wanted in _layer_linears(model.decoder.layers, list(lora_attn_modules), apply_lora_to_mlp):
        fp8 = fp8_base and decoder_trainable != "full"
        _swap(parent, name, lora=decoder_lora and wanted, fp8=fp8, **adapter)
    if vision_trainable == "lora":
        for parent, name, wanted in _layer_linears(
            model.encoders["image"].vision.layers, list(lora_attn_modules), apply_lora_to_mlp
        ):
            _swap(parent, name, lora=wanted, fp8=False, **adapter)
    if projector_trainable == "lora":
        for name in _PROJECTOR:
            _swap(model.encoders["image"].projector, name, lora=True, fp8=False, **adapter)
    if apply_lora_to_output:
        _swap(model.decoder, "output", lora=True, fp8=False, **adapter)
    set_trainable_params(model, fully_trained | set(get_adapter_params(model)))
    return model


def mistral3_lora(**kwargs: Any) -> Mistral3FusionModel:
    """Mistral 3 VLM (:func:`mistral3`, every dimension explicit) with LoRA adapters.

    Args:
        **kwargs (Any): the LoRA arguments (``lora_attn_modules``, ``apply_lora_to_mlp``,
            ``apply_lora_to_output``, ``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``decoder_trainable``,
            ``vision_trainable``, ``projector_trainable``, ``fp8_base``, ``fp8_matmul``; see
            :func:`_build_lora`) and the :func:`mistral3` dimensions.

    Returns:
        Mistral3FusionModel: the model; only adapter parameters (and ``"full"`` parts) have ``requires_grad``.
    """
    return _build_lora(mistral3, **kwargs)


def mistral3p5_128b_lora(**kwargs: Any) -> Mistral3FusionModel:
    """Mistral Medium 3.5 (:func:`~torchtune_mistral3.models.mistral3.mistral3p5_128b`) with LoRA adapters.

    Args:
        **kwargs (Any): the LoRA arguments of :func:`mistral3_lora`, and overrides of the model's dimensions.

    Returns:
        Mistral3FusionModel: the model.
    """
    return _build_lora(mistral3p5_128b, **kwargs)


def ministral3_3b_lora(**kwargs: Any) -> Mistral3FusionModel:
    """Ministral-3 3B (:func:`~torchtune_mistral3.models.mistral3.ministral3_3b`) with LoRA; tied head, no output LoRA.

    Args:
        **kwargs (Any): the LoRA arguments of :func:`mistral3_lora`, and overrides of the model's dimensions.

    Returns:
        Mistral3FusionModel: the model.
    """
    return _build_lora(ministral3_3b, **kwargs)


def ministral3_8b_lora(**kwargs: Any) -> Mistral3FusionModel:
    """Ministral-3 8B (:func:`~torchtune_mistral3.models.mistral3.ministral3_8b`) with LoRA adapters.

    Args:
        **kwargs (Any): the LoRA arguments of :func:`mistral3_lora`, and overrides of the model's dimensions.

    Returns:
        Mistral3FusionModel: the model.
    """
    return _build_lora(ministral3_8b, **kwargs)


def ministral3_14b_lora(**kwargs: Any) -> Mistral3FusionModel:
    """Ministral-3 14B (:func:`~torchtune_mistral3.models.mistral3.ministral3_14b`) with LoRA adapters.

    Args:
        **kwargs (Any): the LoRA arguments of :func:`mistral3_lora`, and overrides of the model's dimensions.

    Returns:
        Mistral3FusionModel: the model.
    """
    return _build_lora(ministral3_14b, **kwargs)
