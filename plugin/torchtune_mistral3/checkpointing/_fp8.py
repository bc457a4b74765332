"""FP8 (E4M3) weights as Mistral stores them: dequantise on load, quantise again on save.

Mistral Medium 3.5 and the Ministral-3 family store each text linear as a ``float8_e4m3fn`` weight plus a
``weight_scale_inv`` that, despite its name, *multiplies*: ``w = w_fp8.float() * weight_scale_inv.float()``.
Their scale is one number per tensor, so any slice of the weight dequantises with the same scale, which is
what lets each rank read only its tensor-parallel shard. Block-scaled checkpoints (DeepSeek style,
``weight_block_size = [bm, bn]``) carry one scale per ``bm x bn`` block; they are handled too by picking
the block scale of every row/column of the slice.
"""

from typing import Optional, Sequence, Tuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
# Largest finite float8_e4m3fn value; a per-tensor scale maps the tensor's absolute maximum onto it.
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)

SCALE_SUFFIX = "_scale_inv"  # appended to "<linear>.weight"
ACTIVATION_SCALE_SUFFIX = "activation_scale"  # replaces "weight" in "<linear>.weight"


def scale_key(weight_key: str) -> str:
    """Return the key of the dequantisation scale that belongs to ``weight_key`` (``<linear>.weight_scale_inv``)."""
    return weight_key + SCALE_SUFFIX


def activation_scale_key(weight_key: str) -> str:
    """Return the key of the static input scale that belongs to ``weight_key`` (``<linear>.activation_scale``)."""
    return weight_key[: -len("weight")] + ACTIVATION_SCALE_SUFFIX


def is_per_tensor_scale(scale_shape: Sequence[int]) -> bool:
    """Return True if a scale of this shape is one number for the whole tensor (0-d, ``[1]`` or ``[1, 1]``)."""
    n = 1
    for d in scale_shape:
        n *= d
    return n == 1


def dequantize(
    weight: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    *,
    block_size: Optional[Sequence[int]] = None,
    offset: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Dequantise an FP8 weight (or a slice of it) with its ``weight_scale_inv``.

    The product is formed in fp32 and rounded once to ``dtype``; with ``dtype=torch.bfloat16`` this is
    ``(w.float() * scale.float()).to(torch.bfloat16)``, the formula transformers and NeMo use. Returning fp32
    and casting later gives the same bits, because the cast is the only rounding step.

    Args:
        weight (torch.Tensor): ``float8_e4m3fn`` values, the whole weight or a 2-D slice of it.
        scale (torch.Tensor): one number (0-d or ``[1]``) for a per-tensor scale, or the whole
            ``[ceil(rows/bm), ceil(cols/bn)]`` grid for a block-scaled weight.
        dtype (torch.dtype): dtype of the result. Default is ``torch.float32``.
        block_size (Optional[Sequence[int]]): ``[bm, bn]`` of a block-scaled weight; None for a per-tensor
            scale. Default is None.
        offset (Optional[Sequence[int]]): global ``(row, col)`` of ``weight[0, 0]`` when ``weight`` is a slice of
            a block-scaled weight (used to pick each element's block). Default is None (the slice starts at 0).

    Returns:
        torch.Tensor: the dequantised values, same shape as ``weight``.

    Raises:
        ValueError: if ``scale`` has more than one element but ``block_size`` is not given, or its grid does
            not cover the weight.
    """
    # In place on the fp32 copy: the largest transient is one fp32 copy of the weight, not two.
    w = weight.to(torch.float32, copy=True)
    if is_per_tensor_scale(scale.shape):
        return w.mul_(scale.reshape(()).to(torch.float32)).to(dtype)
    if block_size is None:
        raise ValueError(
            f"a scale of shape {tuple(scale.shape)} is a block scale, but no weight_block_size was given; "
            "set quantization_config.weight_block_size in config.json"
        )
    if w.dim() != 2 or scale.dim() != 2:
        raise ValueError(
            f"block-scaled FP8 needs a 2-D weight and scale, got {tuple(w.shape)} and {tuple(scale.shape)}"
        )
    bm, bn = int(block_size[0]), int(block_size[1])
    r0, c0 = (0, 0) if offset is None else (int(offset[0]), int(offset[1]))
    rows = torch.arange(r0, r0 + w.shape[0]) // bm
    cols = torch.arange(c0, c0 + w.shape[1]) // bn
    if len(rows) and (rows[-1] >= scale.shape[0]) or len(cols) and (cols[-1] >= scale.shape[1]):
        raise ValueError(
            f"scale grid {tuple(scale.shape)} with blocks {bm}x{bn} does not cover weight rows "
            f"{r0}..{r0 + w.shape[0]} / cols {c0}..{c0 + w.shape[1]}"
        )
    return w.mul_(scale.to(torch.float32)[rows][:, cols]).to(dtype)


def quantize_per_tensor(
    weight: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantise a weight to FP8 E4M3 with one scale, in the format Mistral ships (``scale = amax / 448``).

    The scale is rounded to ``scale_dtype`` first and the division uses the rounded value, so that
    :func:`dequantize` of the result is the best FP8 approximation under the scale actually stored.

    Args:
        weight (torch.Tensor): the weight, any float dtype.
        scale_dtype (torch.dtype): dtype of the stored 0-d scale. Default is ``torch.bfloat16``.

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: the ``float8_e4m3fn`` weight and its 0-d ``weight_scale_inv``.
    """
    w = weight.detach().to(torch.float32)
    amax = w.abs().amax() if w.numel() else torch.zeros((), device=w.device)
    # An all-zero tensor gets scale 1 rather than 0, so dequantising stays finite.
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones((), device=w.device)).to(scale_dtype)
    q = (w / scale.to(torch.float32)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale
