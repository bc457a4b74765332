"""What a loader reads tensors from: the ``TensorSource`` protocol, the stored tensor's description, block checks.

:func:`~torchtune_mistral3.checkpointing.load_into_module` reads each state dict entry (or this rank's block of
it) from a :class:`TensorSource`: the checkpoint reader, its FP8-keeping view (``RawFP8Source``), the LoRA
adapters' initialisation (``AdapterInit``) and the rehearsal's planned reader all have this shape.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence, Tuple, Union

import torch

from torchtune_mistral3.checkpointing import _fp8


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the checkpoint and how it is stored.

    Args:
        hf_key (str): key in the safetensors file.
        path (Path): the safetensors file holding it.
        dtype (torch.dtype): dtype on disk.
        shape (Tuple[int, ...]): shape on disk.
        scale_key (Optional[str]): key of the FP8 ``weight_scale_inv``, None for an unquantised tensor.
        scale_path (Optional[Path]): file holding the scale (an index may put it in another shard).
        scale_shape (Optional[Tuple[int, ...]]): shape of the scale on disk (``()`` or ``[1]`` per tensor, a
            grid of blocks otherwise). Default is None.
    """

    hf_key: str
    path: Path
    dtype: torch.dtype
    shape: Tuple[int, ...]
    scale_key: Optional[str] = None
    scale_path: Optional[Path] = None
    scale_shape: Optional[Tuple[int, ...]] = None

    @property
    def is_fp8(self) -> bool:
        """bool: True if the tensor is stored as FP8 with a dequantisation scale."""
        return self.scale_key is not None


class TensorSource(Protocol):
    """A source of named tensors that hands out any block of each: what ``load_into_module`` reads from.

    Attributes:
        checkpoint_dir (Union[str, Path]): what the source reads, named in error messages.
    """

    checkpoint_dir: Union[str, Path]

    def __contains__(self, key: object) -> bool: ...

    def info(self, key: str) -> TensorInfo:
        """Return where and how ``key`` is stored (its full shape above all)."""
        ...

    def read(
        self,
        key: str,
        dtype: Optional[torch.dtype] = None,
        *,
        offset: Optional[Sequence[int]] = None,
        shape: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """Return ``key``, or its block ``[offset, offset + shape)``, as a new CPU tensor of ``dtype``."""
        ...


def checked_block(
    info: TensorInfo, offset: Optional[Sequence[int]], shape: Optional[Sequence[int]]
) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """The block ``[offset, offset + shape)`` of the stored tensor, defaults filled in, checked against its shape.

    Args:
        info (TensorInfo): the stored tensor.
        offset (Optional[Sequence[int]]): block start; None for zeros.
        shape (Optional[Sequence[int]]): block size; None for the whole tensor.

    Returns:
        Tuple[Tuple[int, ...], Tuple[int, ...]]: offset and shape.

    Raises:
        ValueError: if the block has another rank than the tensor or lies outside it (file, key and shapes named).
    """
    full = tuple(info.shape)
    offset = tuple(offset) if offset is not None else (0,) * len(full)
    shape = tuple(shape) if shape is not None else full
    if len(offset) != len(full) or len(shape) != len(full) or any(
        o < 0 or o + s > n for o, s, n in zip(offset, shape, full)
    ):
        raise ValueError(
            f"'{info.path}': block offset {list(offset)} shape {list(shape)} lies outside '{info.hf_key}' "
            f"of shape {list(full)}"
        )
    return offset, shape


def check_fp8_base(info: TensorInfo) -> None:
    """Check that a frozen FP8 base weight can hold the stored tensor as it is: FP8 with a per-tensor scale.

    Args:
        info (TensorInfo): the stored weight.

    Raises:
        ValueError: if it is stored unquantised or with block scales; the message names file, key and the
            switch to use (``model.fp8_base=False``).
    """
    if not info.is_fp8:
        raise ValueError(
            f"'{info.path}': '{info.hf_key}' is stored as {info.dtype}, not FP8, but the model keeps it as a "
            "frozen FP8 base weight: set model.fp8_base=False to load this checkpoint in the compute dtype"
        )
    if info.scale_shape is not None and not _fp8.is_per_tensor_scale(info.scale_shape):
        raise ValueError(
            f"'{info.scale_path}': '{info.scale_key}' is a block scale {list(info.scale_shape)}; the frozen FP8 "
            f"base keeps per-tensor scales only ('{info.hf_key}'): set model.fp8_base=False"
        )
