"""Frozen FP8 base linears: the checkpoint's own per-tensor FP8 weights kept in memory, dequantised on the fly.

Mistral stores every text linear as ``float8_e4m3fn`` bytes and one ``weight_scale_inv`` that multiplies
(``w = w_fp8 * scale``). :class:`FP8LoRALinear` keeps exactly those bytes as its (frozen) ``weight``
parameter and the scale as a buffer, so FSDP2 shards and all-gathers one byte per weight (it moves a
parameter group of mixed dtypes as ``uint8``), and each layer's weight is dequantised only for its matmul.
The LoRA path runs in the compute dtype. :class:`FrozenFP8Linear` is the same base without an adapter, for
the frozen linears that get no LoRA.

The base matmul dequantises (``torch.float8_e4m3fn`` -> compute dtype, times the scale) and calls
``F.linear``; backward recomputes the dequantised weight from the FP8 bytes, so autograd keeps one byte per
weight between forward and backward, not a compute-dtype copy.
"""

from typing import List

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules.peft import AdapterModule
from torchtune.modules.peft.lora import _lora_a_init_params, _lora_b_init_params

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
SCALE_NAME = "weight_scale_inv"  # the buffer's name: the checkpoint's own key suffix
# How the frozen base multiplies: dequantise the weight and run the compute-dtype matmul, or quantise the input
# per tensor and run torch._scaled_mm on the FP8 bytes (FP8 tensor cores). Which is faster on the H200 is
# not measured yet; "dequantize" is exact with respect to the compute-dtype base.
FP8_MATMULS = ("dequantize", "scaled_mm")


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dequantise an FP8 weight to ``dtype`` with the same bits as the checkpoint loader gives.

    The loader (``checkpointing._fp8.dequantize``) forms ``(w.float() * scale.float()).to(dtype)``. When
    ``dtype`` is fp32, or ``scale`` is already
    stored in ``dtype``, multiplying in ``dtype`` gives the same bits (FP8 E4M3 values and the scale are exact
    in it, and the one product rounds once), without an fp32 copy of the weight.

    Args:
        weight (torch.Tensor): ``float8_e4m3fn`` weight (a plain tensor, the local or the all-gathered one).
        scale (torch.Tensor): its 0-d ``weight_scale_inv``.
        dtype (torch.dtype): compute dtype.

    Returns:
        torch.Tensor: the dequantised weight in ``dtype``.
    """
    if dtype == torch.float32 or scale.dtype == dtype:
        return weight.to(dtype).mul_(scale.to(dtype))
    return weight.to(torch.float32).mul_(scale.to(torch.float32)).to(dtype)


class _FP8Linear(torch.autograd.Function):
    """``x @ dequantize(w_fp8, scale).T`` saving only the FP8 bytes for backward (no weight gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        return F.linear(x, dequantize_weight(weight, scale, x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight, scale = ctx.saved_tensors
        return grad_out @ dequantize_weight(weight, scale, grad_out.dtype), None, None


def quantize_activation(x: torch.Tensor):
    """Per-tensor dynamic FP8 E4M3 quantisation of an input: ``x ~ x_fp8 * scale``, ``scale = amax / 448``.

    Args:
        x (torch.Tensor): the input, any float dtype.

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: the ``float8_e4m3fn`` values and the fp32 0-d scale.
    """
    amax = x.detach().abs().amax().float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


class _FP8ScaledMMLinear(_FP8Linear):
    """``torch._scaled_mm(fp8(x), w_fp8.T)`` forward; backward as :class:`_FP8Linear` (dequantised weight)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        xq, x_scale = quantize_activation(x.reshape(-1, x.shape[-1]))
        w_scale = scale.float().reshape(())
        out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype)
        return out.reshape(*x.shape[:-1], weight.shape[0])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, matmul: str = "dequantize") -> torch.Tensor:
    """Linear map by a frozen per-tensor FP8 weight.

    Args:
        x (torch.Tensor): input ``[..., in_dim]`` in the compute dtype.
        weight (torch.Tensor): ``float8_e4m3fn`` weight ``[out_dim, in_dim]``.
        scale (torch.Tensor): its 0-d ``weight_scale_inv``.
        matmul (str): ``"dequantize"`` (weight to the compute dtype, then ``F.linear``) or ``"scaled_mm"``
            (input quantised per tensor, ``torch._scaled_mm`` on the FP8 bytes). Default is "dequantize".

    Returns:
        torch.Tensor: ``[..., out_dim]`` in the dtype of ``x``.

    Raises:
        ValueError: for an unknown ``matmul``.
    """
    if matmul == "dequantize":
        return _FP8Linear.apply(x, weight, scale)
    if matmul == "scaled_mm":
        return _FP8ScaledMMLinear.apply(x, weight, scale)
    raise ValueError(f"fp8_matmul='{matmul}' is not one of {list(FP8_MATMULS)}")


class FrozenFP8Linear(nn.Module):
    """A frozen bias-free linear whose weight is stored as per-tensor FP8 (``weight`` + ``weight_scale_inv``).

    Args:
        in_dim (int): input dimension.
        out_dim (int): output dimension.
        matmul (str): ``"dequantize"`` or ``"scaled_mm"`` (see :func:`fp8_linear`). Default is "dequantize".

    Raises:
        ValueError: for an unknown ``matmul``.
    """

    def __init__(self, in_dim: int, out_dim: int, matmul: str = "dequantize") -> None:
        super().__init__()
        if matmul not in FP8_MATMULS:
            raise ValueError(f"fp8_matmul='{matmul}' is not one of {list(FP8_MATMULS)}")
        self.in_dim, self.out_dim, self.matmul = in_dim, out_dim, matmul
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim, dtype=FP8_DTYPE), requires_grad=False)
        # fp32 placeholder; the loader assigns the checkpoint's scale with its stored dtype
        self.register_buffer(SCALE_NAME, torch.ones((), dtype=torch.float32))

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """Return the base weight in ``dtype`` (for merging and export).

        Args:
            dtype (torch.dtype): the result's dtype.

        Returns:
            torch.Tensor: the dequantised weight (a DTensor if ``weight`` is one).
        """
        return dequantize_weight(self.weight.detach(), getattr(self, SCALE_NAME), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the frozen FP8 linear.

        Args:
            x (torch.Tensor): input ``[..., in_dim]``.

        Returns:
            torch.Tensor: output ``[..., out_dim]``.
        """
        return fp8_linear(x, self.weight, getattr(self, SCALE_NAME), self.matmul)


class FP8LoRALinear(FrozenFP8Linear, AdapterModule):
    """:class:`~torchtune.modules.peft.LoRALinear` over a frozen per-tensor FP8 base weight.

    ``x -> dequantize(W_fp8, s) x + (alpha / rank) B A dropout(x)``; A and B are in the compute dtype and are
    initialised as in ``LoRALinear`` (Kaiming-uniform A, zero B), with the same state dict keys
    (``lora_a.weight``, ``lora_b.weight``) and ``adapter_params()``.

    Args:
        in_dim (int): input dimension.
        out_dim (int): output dimension.
        rank (int): LoRA rank.
        alpha (float): LoRA scaling numerator.
        dropout (float): dropout before the adapter. Default is 0.0.
        matmul (str): the base matmul, ``"dequantize"`` or ``"scaled_mm"``. Default is "dequantize".
    """

    def __init__(
        self, in_dim: int, out_dim: int, rank: int, alpha: float, dropout: float = 0.0, matmul: str = "dequantize"
    ) -> None:
        super().__init__(in_dim, out_dim, matmul)
        self.rank, self.alpha = rank, alpha
        self.disabled = False
        self.dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.lora_a = nn.Linear(in_dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_dim, bias=False)
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """Kaiming-uniform A, zero B (as ``LoRALinear``)."""
        _lora_a_init_params(self.lora_a)
        _lora_b_init_params(self.lora_b)

    def adapter_params(self) -> List[str]:
        """Names of the adapter's parameters.

        Returns:
            List[str]: ``["lora_a.weight", "lora_b.weight"]``.
        """
        return ["lora_a.weight", "lora_b.weight"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the FP8 base and the LoRA update.

        Args:
            x (torch.Tensor): input ``[..., in_dim]``.

        Returns:
            torch.Tensor: output ``[..., out_dim]``.
        """
        out = super().forward(x)
        if self.disabled:
            return out
        return out + (self.alpha / self.rank) * self.lora_b(self.lora_a(self.dropout(x)))
