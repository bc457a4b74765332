"""What ``load_into_module`` reads from (``TensorSource``), the stored tensor's description, the checks of a read.

Sources: the checkpoint reader, ``RawFP8Source``, ``AdapterInit``, the rehearsal's planned reader.
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
    """Named tensors, any block of each: ``info(key)`` describes one, ``read`` returns ``[offset, offset + shape)``.

    ``checkpoint_dir`` names the source in error messages.
    """

    checkpoint_dir: Union[str, Path]

    def __contains__(self, key: object) -> bool: ...

    def info(self, key: str) -> TensorInfo: ...

    def read(
        self, key: str, dtype: Optional[torch.dtype] = None, *, offset: Optional[Sequence[int]] = None,
        shape: Optional[Sequence[int]] = None,
    ) -> torch.Tensor: ...


def checked_block(
    info: TensorInfo, offset: Optional[Sequence[int]], shape: Optional[Sequence[int]]
) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Offset and shape of the block ``[offset, offset + shape)`` (None: zeros, the whole tensor), checked.

    Raises:
        ValueError: if the block lies outside the stored tensor (file, key and shapes named).
    """
    full = tuple(info.shape)
    offset = tuple(offset) if offset is not None else (0,) * len(full)
    shape = tuple(shape) if shape is not None else full
    if not (len(offset) == len(shape) == len(full) and all(0 <= o <= n - s for o, s, n in zip(offset, shape, full))):
        raise ValueError(
            f"'{info.path}': block offset {list(offset)} shape {list(shape)} lies outside '{info.hf_key}' "
            f"of shape {list(full)}"
        )
    return offset, shape


def check_fp8_base(info: TensorInfo) -> None:
    """Check that a frozen FP8 base weight can hold the stored tensor as it is: FP8 with a per-tensor scale.

    Raises:
        ValueError: if it is stored unquantised or block-scaled (file, key and ``model.fp8_base=False`` named).
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
