"""RMSNorm that rounds like transformers' Mistral norms."""

import torch
import torch.nn.functional as F
from torchtune.modules import RMSNorm


class Mistral3RMSNorm(RMSNorm):
    """:class:`~torchtune.modules.RMSNorm` (same ``scale`` parameter and type) with transformers' rounding order.

    transformers normalises in fp32, casts to the input dtype, then multiplies by the weight in that dtype;
    torchtune multiplies by the weight in fp32 before casting. In fp32 both agree; in bf16 this order reproduces
    transformers' values, and the weight-free ``F.rms_norm`` keeps the fused kernel (torchtune's fp32 input with
    a bf16 weight falls back to the unfused path).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dimension.

        Args:
            x (torch.Tensor): input of shape ``[..., dim]``.

        Returns:
            torch.Tensor: normalised and scaled tensor, same shape and dtype as ``x`` (for a ``scale`` of x's dtype).
        """
        return F.rms_norm(x.float(), self.normalized_shape, eps=self.eps).to(x.dtype) * self.scale
