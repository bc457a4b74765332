"""Pixtral vision encoder.

Patch convolution, RMSNorm, then transformer layers over all images packed in one sequence, with 2-D RoPE and
attention confined to each image.
"""

from typing import List, Sequence, Tuple

import torch
from torch import nn
from torchtune.modules import RMSNorm

from ._attention import image_patch_offsets
from ._position_embeddings import pixtral_patch_positions


def patch_grid_sizes(image_sizes: torch.Tensor, patch_size: int) -> List[Tuple[int, int]]:
    """(rows, cols) of patches of every image, read to the host once.

    Args:
        image_sizes (torch.Tensor): true (height, width) in pixels of each image, shape ``[n, 2]``.
        patch_size (int): patch side in pixels.

    Returns:
        List[Tuple[int, int]]: one (rows, cols) per image.

    Raises:
        ValueError: if a side is not a positive multiple of ``patch_size``.
    """
    grids = []
    for i, (h, w) in enumerate(image_sizes.tolist()):
        if h <= 0 or w <= 0 or h % patch_size or w % patch_size:
            raise ValueError(
                f"image {i} has size {h}x{w} px; Pixtral needs positive multiples of {patch_size} px "
                "(the model transform resizes images to multiples of patch_size * spatial_merge_size)"
            )
        grids.append((h // patch_size, w // patch_size))
    return grids


class PixtralVisionEncoder(nn.Module):
    """Pixtral vision tower (transformers' ``PixtralVisionModel``; the last layer's output, no final norm).

    Images of different sizes arrive zero-padded to a common size; the convolution runs on the padded batch,
    then only each image's own patches are kept and concatenated, row-major, image after image. An empty batch
    (``n == 0``) still runs every layer on an empty sequence, so that data-parallel ranks without images take
    part in the same collectives as ranks with images.

    Args:
        patch_size (int): patch side in pixels.
        patch_conv (nn.Module): ``Conv2d(num_channels, d, patch_size, stride=patch_size, bias=False)``.
        ln_pre (RMSNorm): norm applied to the patch embeddings.
        layers (nn.ModuleList): ``TransformerSelfAttentionLayer`` s whose attention is an ``ImageBlockAttention``
            with a :class:`PixtralRotaryPositionalEmbeddings` of side ``max_patches_per_side``.
        max_patches_per_side (int): ``image_size // patch_size``, the side of the 2-D position table.
    """

    def __init__(
        self,
        *,
        patch_size: int,
        patch_conv: nn.Module,
        ln_pre: RMSNorm,
        layers: nn.ModuleList,
        max_patches_per_side: int,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.patch_conv = patch_conv
        self.ln_pre = ln_pre
        self.layers = layers
        self.max_patches_per_side = max_patches_per_side

    def forward(self, pixel_values: torch.Tensor, grid_sizes: Sequence[Tuple[int, int]]) -> torch.Tensor:
        """Encode a batch of images.

        Args:
            pixel_values (torch.Tensor): normalised images zero-padded bottom/right, shape ``[n, c, h_max, w_max]``.
                Cast to the convolution's dtype here.
            grid_sizes (Sequence[Tuple[int, int]]): true (rows, cols) of patches of each image, from
                :func:`patch_grid_sizes` (host-side, so the image sizes are read from the device once per batch).

        Returns:
            torch.Tensor: patch features of all images, shape ``[p, d]`` with ``p = sum(h_i * w_i) / patch_size**2``.

        Notation used for tensor shapes:
            - n: number of images
            - c: image channels
            - p: total number of patches
            - d: vision hidden size
        """
        grids = grid_sizes
        # [n, d, rows_max, cols_max] -> [n * rows_max * cols_max, d]
        x = self.patch_conv(pixel_values.to(self.patch_conv.weight.dtype))
        n, d, rows_max, cols_max = x.shape
        x = x.flatten(2).transpose(1, 2).reshape(-1, d)

        keep = [torch.zeros(0, dtype=torch.long)]
        for i, (rows, cols) in enumerate(grids):
            offset = i * rows_max * cols_max
            keep.append((offset + torch.arange(rows)[:, None] * cols_max + torch.arange(cols)[None, :]).flatten())
        keep = torch.cat(keep).to(x.device, non_blocking=True)
        positions = pixtral_patch_positions(grids, self.max_patches_per_side).to(x.device, non_blocking=True)

        # [1, p, d]: all images in one sequence; attention stays within each image's span, given to the blocks
        # as a tensor of patch offsets (no Python value of the batch reaches a compiled block)
        x = self.ln_pre(x.index_select(0, keep).unsqueeze(0))
        offsets = image_patch_offsets([rows * cols for rows, cols in grids], x.device)
        for layer in self.layers:
            x = layer(x, mask=offsets, input_pos=positions.unsqueeze(0))
        return x.squeeze(0)
