"""Mistral 3 multimodal projector: RMSNorm, 2x2 patch merger, then Linear -> GELU -> Linear into the text width."""

from typing import Sequence, Tuple

import torch
from torch import nn
from torchtune.modules import RMSNorm


def patch_merge_index(grid_sizes: Sequence[Tuple[int, int]], merge: int) -> torch.Tensor:
    """Gather index that groups each ``merge x merge`` block of patches, for images packed row-major.

    Row ``m`` lists the packed-sequence indices of the patches of merged token ``m``, in kernel order
    (``a * merge + b`` for the patch at offset (a, b) inside the block); blocks are row-major within an image
    and images follow each other.

    Args:
        grid_sizes (Sequence[Tuple[int, int]]): (rows, cols) of patches per image.
        merge (int): spatial merge size.

    Returns:
        torch.Tensor: CPU LongTensor of shape ``[num_merged_tokens, merge * merge]``.

    Raises:
        ValueError: if an image's patch grid is not divisible by ``merge``.
    """
    index = [torch.zeros(0, merge * merge, dtype=torch.long)]
    offset = 0
    for i, (rows, cols) in enumerate(grid_sizes):
        if rows % merge or cols % merge:
            raise ValueError(
                f"image {i} is {rows}x{cols} patches, not divisible by spatial_merge_size={merge}; "
                "image sides must be multiples of patch_size * spatial_merge_size pixels"
            )
        patch = offset + torch.arange(rows * cols).view(rows // merge, merge, cols // merge, merge)
        # [rows/m, a, cols/m, b] -> [rows/m, cols/m, a, b] -> [blocks, m*m]
        index.append(patch.permute(0, 2, 1, 3).reshape(-1, merge * merge))
        offset += rows * cols
    return torch.cat(index)


class Mistral3Projector(nn.Module):
    """Maps Pixtral patch features to text embeddings, one per ``merge x merge`` block of patches.

    Merged features pack each block channel-major (channel ``c`` of the patch at block offset (a, b) lands at
    ``c * merge**2 + a * merge + b``), as transformers' ``Mistral3PatchMerger`` (an ``unfold``) does.

    Args:
        norm (RMSNorm): norm over vision features (it uses the *text* ``rms_norm_eps``).
        patch_merger (nn.Linear): ``Linear(merge**2 * d_v, d_v, bias=False)``.
        linear_1 (nn.Linear): ``Linear(d_v, d)``.
        activation (nn.Module): activation between the two linears (exact GELU for released checkpoints).
        linear_2 (nn.Linear): ``Linear(d, d)``.
        spatial_merge_size (int): side of the merged block, in patches.
    """

    def __init__(
        self,
        *,
        norm: RMSNorm,
        patch_merger: nn.Linear,
        linear_1: nn.Linear,
        activation: nn.Module,
        linear_2: nn.Linear,
        spatial_merge_size: int,
    ) -> None:
        super().__init__()
        self.norm = norm
        self.patch_merger = patch_merger
        self.linear_1 = linear_1
        self.activation = activation
        self.linear_2 = linear_2
        self.spatial_merge_size = spatial_merge_size

    def forward(self, features: torch.Tensor, grid_sizes: Sequence[Tuple[int, int]]) -> torch.Tensor:
        """Project packed patch features.

        Args:
            features (torch.Tensor): vision features of all images, row-major per image, shape ``[p, d_v]``.
            grid_sizes (Sequence[Tuple[int, int]]): (rows, cols) of patches of each image.

        Returns:
            torch.Tensor: shape ``[p / merge**2, d]``.

        Notation used for tensor shapes:
            - p: total number of patches
            - d_v: vision hidden size
            - d: text hidden size
        """
        merge = self.spatial_merge_size
        index = patch_merge_index(grid_sizes, merge)
        x = self.norm(features)
        # [blocks, m*m, d_v] -> [blocks, d_v, m*m] -> [blocks, d_v*m*m] (channel-major)
        x = x[index.to(x.device, non_blocking=True)].transpose(1, 2).flatten(1)
        x = self.patch_merger(x)
        return self.linear_2(self.activation(self.linear_1(x)))
