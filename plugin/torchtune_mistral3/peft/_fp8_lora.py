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
SCALE_NAME = "weight_scale_inv"  # the buffer's name: the checkpoint's own key suffix


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


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Linear map by a frozen per-tensor FP8 weight, dequantised for the matmul.

    Args:
        x (torch.Tensor): input ``[..., in_dim]`` in the compute dtype.
        weight (torch.Tensor): ``float8_e4m3fn`` weight ``[out_dim, in_dim]``.
        scale (torch.Tensor): its 0-d ``weight_scale_inv``.

    Returns:
        torch.Tensor: ``[..., out_dim]`` in the dtype of ``x``.
    """
    return _FP8Linear.apply(x, weight, scale)


class FrozenFP8Linear(nn.Module):
    """A frozen bias-free linear whose weight is stored as per-tensor FP8 (``weight`` + ``weight_scale_inv``).

    Args:
        in_dim (int): input dimension.
        out_dim (int): output dimension.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
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
        return fp8_linear(x, self.weight, getattr(self, SCALE_NAME))


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
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(in_dim, out_dim)
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
