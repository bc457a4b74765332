"""Rotary position embeddings of the Mistral 3 family, in transformers' rotate-half layout.

- :class:`YarnRotaryPositionalEmbeddings`: 1-D RoPE for the text decoder, with YaRN frequency interpolation
  (or plain RoPE when no scaling factor is given).
- :class:`Llama4QueryScale`: the per-position query temperature ``1 + beta * ln(1 + floor(p / L0))`` that
  Ministral-3 applies to queries after RoPE.
- :class:`PixtralRotaryPositionalEmbeddings`: the 2-D (row, column) RoPE of the Pixtral vision encoder.

All three keep their tables in non-persistent buffers (never in the state dict) and rebuild them in
``rope_init()``, which the torchtune recipes call after initialising a model on the meta device. Tables are
computed in fp32 with the same operations, in the same order, as transformers, so fp32 results match it
exactly and lower precisions round the same way (tables are cast to the activation dtype at use).
"""

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn


def _inverse_frequencies(dim: int, base: float) -> torch.Tensor:
    """``1 / base^(2i/dim)`` for i < dim/2, computed on the CPU in fp32 (as transformers does at model build)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))


def yarn_inverse_frequencies(
    dim: int,
    base: float,
    scaling_factor: float,
    original_max_seq_len: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> torch.Tensor:
    """YaRN inverse frequencies: interpolated for long wavelengths, extrapolated for short ones, ramp between.

    Args:
        dim (int): rotary dimension (the attention head dimension).
        base (float): RoPE base (``rope_theta``).
        scaling_factor (float): YaRN context extension factor.
        original_max_seq_len (int): context length the model was pre-trained with (``L0``).
        beta_fast (float): number of rotations marking the end of the extrapolated band. Default is 32.0.
        beta_slow (float): number of rotations marking the start of the interpolated band. Default is 1.0.
        truncate (bool): round the band edges to whole dimensions (floor/ceil). Default is True.

    Returns:
        torch.Tensor: fp32 CPU tensor of shape ``[dim // 2]``.
    """

    def band_edge(num_rotations: float) -> float:
        return (dim * math.log(original_max_seq_len / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = band_edge(beta_fast), band_edge(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width band would divide by zero

    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (scaling_factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    return interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight


def yarn_attention_factor(scaling_factor: float, mscale: Optional[float], mscale_all_dim: Optional[float]) -> float:
    """The factor YaRN multiplies cos and sin by (so attention logits scale by its square).

    Args:
        scaling_factor (float): YaRN context extension factor.
        mscale (Optional[float]): numerator magnitude scale; used only if both it and ``mscale_all_dim`` are non-zero.
        mscale_all_dim (Optional[float]): denominator magnitude scale.

    Returns:
        float: ``m(f, mscale) / m(f, mscale_all_dim)`` if both are set and non-zero, else ``m(f, 1)``, with
        ``m(f, s) = 0.1 * s * ln(f) + 1`` for ``f > 1`` and 1 otherwise.
    """

    def magnitude(factor: float, scale: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

    if mscale and mscale_all_dim:
        return float(magnitude(scaling_factor, mscale) / magnitude(scaling_factor, mscale_all_dim))
    return magnitude(scaling_factor)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the last dim of ``x`` ([b, s, n_h, h_d]) with half-width tables [b or 1, s, h_d/2].

    Written per half, ``x1*c - x2*s`` and ``x2*c + x1*s`` are bit-identical to transformers'
    ``x*cat(c, c) + rotate_half(x)*cat(s, s)`` but skip the concatenated tables.
    """
    cos = cos.to(x.dtype).unsqueeze(2)
    sin = sin.to(x.dtype).unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _rows(table: torch.Tensor, seq_len: int, input_pos: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows of ``table`` for positions ``input_pos`` ([b, s]) or ``0..seq_len-1``; shape [b or 1, s, ...]."""
    if input_pos is None:
        return table[:seq_len].unsqueeze(0)
    return table[input_pos]


class YarnRotaryPositionalEmbeddings(nn.Module):
    """Text RoPE with YaRN scaling, as transformers computes it for ``rope_type: yarn`` (or ``default``).

    Args:
        dim (int): attention head dimension.
        max_seq_len (int): number of positions to tabulate.
        base (float): RoPE base (``rope_theta``).
        scaling_factor (Optional[float]): YaRN factor; None gives plain RoPE (``rope_type: default``). Default is None.
        original_max_seq_len (Optional[int]): pre-training context length ``L0``; required with ``scaling_factor``.
            Default is None.
        beta_fast (float): YaRN ``beta_fast``. Default is 32.0.
        beta_slow (float): YaRN ``beta_slow``. Default is 1.0.
        mscale (Optional[float]): YaRN ``mscale``. Default is None.
        mscale_all_dim (Optional[float]): YaRN ``mscale_all_dim``. Default is None.
        attention_factor (Optional[float]): explicit cos/sin factor; overrides the one derived from the mscales.
            Default is None.
        truncate (bool): YaRN ``truncate``. Default is True.

    Raises:
        ValueError: if ``scaling_factor`` is given without ``original_max_seq_len``.
    """

    def __init__(
        self,
        dim: int,
        max_seq_len: int,
        base: float,
        scaling_factor: Optional[float] = None,
        original_max_seq_len: Optional[int] = None,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        mscale: Optional[float] = None,
        mscale_all_dim: Optional[float] = None,
        attention_factor: Optional[float] = None,
        truncate: bool = True,
    ) -> None:
        super().__init__()
        if scaling_factor is not None and original_max_seq_len is None:
            raise ValueError("YaRN RoPE needs original_max_seq_len (rope_parameters.original_max_position_embeddings)")
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.base = base
        self.scaling_factor = scaling_factor
        self.original_max_seq_len = original_max_seq_len
        self.beta_fast = beta_fast
        self.beta_slow = beta_slow
        self.truncate = truncate
        if attention_factor is None:
            attention_factor = (
                1.0 if scaling_factor is None else yarn_attention_factor(scaling_factor, mscale, mscale_all_dim)
            )
        self.attention_factor = attention_factor
        self.rope_init()

    def inverse_frequencies(self) -> torch.Tensor:
        """Return the fp32 CPU inverse frequencies, shape ``[dim // 2]``."""
        if self.scaling_factor is None:
            return _inverse_frequencies(self.dim, self.base)
        return yarn_inverse_frequencies(
            self.dim,
            self.base,
            self.scaling_factor,
            self.original_max_seq_len,
            self.beta_fast,
            self.beta_slow,
            self.truncate,
        )

    def rope_init(self) -> None:
        """(Re)build the cos/sin tables on the current default device (the recipe calls this after meta init)."""
        inv_freq = self.inverse_frequencies().to(torch.empty(0).device)
        angles = torch.arange(self.max_seq_len, device=inv_freq.device).float()[:, None] * inv_freq[None, :]
        self.register_buffer("cos", angles.cos() * self.attention_factor, persistent=False)
        self.register_buffer("sin", angles.sin() * self.attention_factor, persistent=False)

    def forward(self, x: torch.Tensor, *, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rotate queries or keys.

        Args:
            x (torch.Tensor): tensor of shape ``[b, s, n_h, h_d]``.
            input_pos (Optional[torch.Tensor]): positions, shape ``[b, s]``; None means ``0..s-1``. Default is None.

        Returns:
            torch.Tensor: rotated tensor, same shape and dtype as ``x``.

        Notation used for tensor shapes:
            - b: batch size
            - s: sequence length
            - n_h: number of heads
            - h_d: head dimension
        """
        seq_len = x.shape[1]
        return _rotate(x, _rows(self.cos, seq_len, input_pos), _rows(self.sin, seq_len, input_pos))


class Llama4QueryScale(nn.Module):
    """Per-position query temperature of Ministral-3: ``q * (1 + beta * ln(1 + floor(p / L0)))``.

    It is 1 below ``L0`` and grows logarithmically beyond, so long-context queries stay sharp. Being a scalar
    per position it commutes with RoPE; transformers applies it after RoPE, and so does this plugin.

    Args:
        beta (float): ``rope_parameters.llama_4_scaling_beta``.
        original_max_seq_len (int): ``rope_parameters.original_max_position_embeddings`` (``L0``).
        max_seq_len (int): number of positions to tabulate.
    """

    def __init__(self, beta: float, original_max_seq_len: int, max_seq_len: int) -> None:
        super().__init__()
        self.beta = beta
        self.original_max_seq_len = original_max_seq_len
        self.max_seq_len = max_seq_len
        self.rope_init()

    def rope_init(self) -> None:
        """(Re)build the scale table on the current default device."""
        # fp32 explicitly: the recipe may call this under a bf16 default dtype
        positions = torch.arange(self.max_seq_len, device=torch.empty(0).device).float()
        scale = 1 + self.beta * torch.log(1 + torch.floor(positions / self.original_max_seq_len))
        self.register_buffer("scale", scale, persistent=False)

    def forward(self, q: torch.Tensor, *, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scale queries.

        Args:
            q (torch.Tensor): queries of shape ``[b, s, n_h, h_d]``.
            input_pos (Optional[torch.Tensor]): positions, shape ``[b, s]``; None means ``0..s-1``. Default is None.

        Returns:
            torch.Tensor: scaled queries, same shape and dtype.
        """
        scale = _rows(self.scale, q.shape[1], input_pos)
        return q * scale.to(q.dtype)[..., None, None]


def pixtral_patch_positions(grid_sizes: Sequence[Tuple[int, int]], max_patches_per_side: int) -> torch.Tensor:
    """Flat 2-D positions ``r * max_patches_per_side + c`` of the patches of images packed one after the other.

    Patches are row-major within an image; positions restart at (0, 0) for every image.

    Args:
        grid_sizes (Sequence[Tuple[int, int]]): (rows, cols) of patches per image.
        max_patches_per_side (int): the position table's side, ``image_size // patch_size``.

    Returns:
        torch.Tensor: CPU LongTensor of shape ``[sum(rows * cols)]``.

    Raises:
        ValueError: if an image has more patches along a side than ``max_patches_per_side``.
    """
    side = max_patches_per_side
    positions = [torch.zeros(0, dtype=torch.long)]
    for i, (rows, cols) in enumerate(grid_sizes):
        if rows > side or cols > side:
            raise ValueError(
                f"image {i} is {rows}x{cols} patches, larger than the vision encoder's {side}x{side} "
                "(vision_config.image_size / patch_size); resize images to at most image_size pixels per side"
            )
        positions.append((torch.arange(rows)[:, None] * side + torch.arange(cols)[None, :]).flatten())
    return torch.cat(positions)


class PixtralRotaryPositionalEmbeddings(nn.Module):
    """2-D RoPE of Pixtral: half of each head rotates with the patch row, half with the column.

    The base frequencies ``inv`` are those of a ``dim``-wide 1-D RoPE; rows use ``inv[0::2]``, columns
    ``inv[1::2]``, and the angle vector of patch (r, c) is ``cat(r * inv[0::2], c * inv[1::2])``.
    Positions are given as flat indices ``r * max_patches_per_side + c`` and restart for every image.

    Args:
        dim (int): attention head dimension (vision hidden size / heads).
        max_patches_per_side (int): largest number of patches along an image side (``image_size // patch_size``).
        base (float): RoPE base (vision ``rope_theta``). Default is 10000.0.
    """

    def __init__(self, dim: int, max_patches_per_side: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.max_patches_per_side = max_patches_per_side
        self.base = base
        self.rope_init()

    def rope_init(self) -> None:
        """(Re)build the cos/sin tables, ``[max_patches_per_side**2, dim // 2]``, on the current default device."""
        inv_freq = _inverse_frequencies(self.dim, self.base).to(torch.empty(0).device)
        side = torch.arange(self.max_patches_per_side, device=inv_freq.device).float()
        rows = (side[:, None] * inv_freq[None, 0::2])[:, None, :].expand(-1, self.max_patches_per_side, -1)
        cols = (side[:, None] * inv_freq[None, 1::2])[None, :, :].expand(self.max_patches_per_side, -1, -1)
        angles = torch.cat((rows, cols), dim=-1).flatten(0, 1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, *, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rotate queries or keys of packed image patches.

        Args:
            x (torch.Tensor): tensor of shape ``[b, s, n_h, h_d]``.
            input_pos (Optional[torch.Tensor]): flat patch positions from :func:`pixtral_patch_positions`,
                shape ``[b, s]``.
                Default is None, which is only accepted so the signature matches torchtune's RoPE modules.

        Returns:
            torch.Tensor: rotated tensor, same shape and dtype as ``x``.

        Raises:
            ValueError: if ``input_pos`` is None.
        """
        if input_pos is None:
            raise ValueError("Pixtral 2-D RoPE needs the patch positions (input_pos)")
        return _rotate(x, self.cos[input_pos], self.sin[input_pos])
