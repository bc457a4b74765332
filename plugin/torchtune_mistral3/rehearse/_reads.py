"""Checkpoint reads planned instead of made: the recipe's own loader runs, every read is checked and recorded."""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from torchtune_mistral3.checkpointing import HFCheckpointReader, RawFP8Source, _fp8
from torchtune_mistral3.checkpointing._reader import TensorInfo


@dataclass(frozen=True)
class PlannedRead:
    """One block a rank would read: the checkpoint tensor, its file, the block, and the dtypes on disk and wanted."""

    key: str
    hf_key: str
    file: str
    offset: Tuple[int, ...]
    shape: Tuple[int, ...]
    stored_dtype: torch.dtype
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """int: bytes read from the file (FP8 blocks at one byte per element)."""
        n = 1
        for d in self.shape:
            n *= d
        return n * self.stored_dtype.itemsize


def _check_block(info: TensorInfo, offset: Tuple[int, ...], shape: Tuple[int, ...], rank: int) -> None:
    full = info.shape
    if len(offset) != len(full) or len(shape) != len(full) or any(
        o < 0 or o + s > n for o, s, n in zip(offset, shape, full)
    ):
        raise ValueError(
            f"rank {rank}: '{info.path}': block offset {list(offset)} shape {list(shape)} lies outside "
            f"'{info.hf_key}' of shape {list(full)}"
        )


class PlannedReader:
    """Stands in for :class:`HFCheckpointReader` in a rehearsal: same index and checks, reads recorded, no bytes.

    ``read`` checks the block against the stored shape (as the real read does) and returns an empty tensor of
    the block's shape in the wanted dtype (fake under the rehearsal's fake runtime).

    Args:
        reader (HFCheckpointReader): the checkpoint, its headers parsed.
        rank (int): the rank whose reads these are (named in errors).
    """

    def __init__(self, reader: HFCheckpointReader, rank: int) -> None:
        self.reader = reader
        self.rank = rank
        self.checkpoint_dir = reader.checkpoint_dir
        self.reads: List[PlannedRead] = []

    def __getattr__(self, name: str):
        return getattr(self.reader, name)

    def __contains__(self, key: object) -> bool:
        return key in self.reader

    def __len__(self) -> int:
        return len(self.reader)

    def keys(self) -> List[str]:
        """Return the checkpoint's plugin keys.

        Returns:
            List[str]: plugin keys.
        """
        return self.reader.keys()

    def info(self, key: str) -> TensorInfo:
        """Return where ``key`` is stored (see :meth:`HFCheckpointReader.info`).

        Args:
            key (str): plugin key.

        Returns:
            TensorInfo: the stored tensor.

        Raises:
            KeyError: naming the key, the checkpoint and this rank.
        """
        if key not in self.reader:
            raise KeyError(f"rank {self.rank}: checkpoint '{self.checkpoint_dir}' has no weight for '{key}'")
        return self.reader.info(key)

    def record(self, info: TensorInfo, key: str, offset, shape, dtype: torch.dtype) -> None:
        """Check and record one block read of ``key`` (stored as ``info``)."""
        offset = tuple(offset) if offset is not None else (0,) * len(info.shape)
        shape = tuple(shape) if shape is not None else tuple(info.shape)
        _check_block(info, offset, shape, self.rank)
        if dtype.is_floating_point and not info.dtype.is_floating_point:
            raise ValueError(f"rank {self.rank}: '{info.path}': '{info.hf_key}' is stored as {info.dtype}, which "
                             f"cannot become the {dtype} weight '{key}'")
        self.reads.append(PlannedRead(key, info.hf_key, info.path.name, offset, shape, info.dtype, dtype))

    def read(
        self,
        key: str,
        dtype: Optional[torch.dtype] = None,
        *,
        offset: Optional[Sequence[int]] = None,
        shape: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """Record the read of ``key`` (or a block of it) and return an empty tensor of its shape.

        Args:
            key (str): plugin key.
            dtype (Optional[torch.dtype]): wanted dtype. Default is None: stored, fp32 for FP8.
            offset (Optional[Sequence[int]]): start of the block. Default is None.
            shape (Optional[Sequence[int]]): size of the block. Default is None.

        Returns:
            torch.Tensor: an empty tensor of the block's shape.
        """
        info = self.info(key)
        want = dtype or (torch.float32 if info.is_fp8 else info.dtype)
        self.record(info, key, offset, shape, want)
        return torch.empty(self.reads[-1].shape, dtype=want)


class PlannedRawFP8Source(RawFP8Source):
    """:class:`RawFP8Source` (the LoRA recipe's frozen FP8 base) over a :class:`PlannedReader`: no bytes read.

    Args:
        reader (PlannedReader): the planned reader.
    """

    def read(
        self,
        key: str,
        dtype: Optional[torch.dtype] = None,
        *,
        offset: Optional[Sequence[int]] = None,
        shape: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """Plan the read of a weight as FP8 bytes, a scale, or (other dtypes) through the planned reader.

        Args:
            key (str): plugin key.
            dtype (Optional[torch.dtype]): the module's dtype for this entry.
            offset (Optional[Sequence[int]]): start of the block. Default is None.
            shape (Optional[Sequence[int]]): size of the block. Default is None.

        Returns:
            torch.Tensor: an empty tensor of the block's shape (a scale: a 0-d tensor).

        Raises:
            ValueError: where :class:`RawFP8Source` would refuse the checkpoint (an unquantised or block-scaled
                weight kept as FP8).
        """
        weight = self._weight_of_scale(key)
        if weight is not None:
            info = self.reader.info(weight)
            scale = TensorInfo(info.scale_key, info.scale_path, torch.bfloat16, ())
            self.reader.record(scale, key, None, None, dtype or torch.float32)
            return torch.ones((), dtype=dtype or torch.float32)
        if dtype != _fp8.FP8_DTYPE:
            return self.reader.read(key, dtype, offset=offset, shape=shape)
        info = self.reader.info(key)
        if not info.is_fp8:
            raise ValueError(
                f"rank {self.reader.rank}: '{info.path}': '{info.hf_key}' is stored as {info.dtype}, not FP8, but "
                "the model keeps it as a frozen FP8 base weight: set model.fp8_base=False"
            )
        if self.reader.block_size is not None:
            raise ValueError(
                f"rank {self.reader.rank}: '{info.scale_path}': '{info.scale_key}' is a block scale; the frozen FP8 "
                "base keeps per-tensor scales only: set model.fp8_base=False"
            )
        self.reader.record(info, key, offset, shape, _fp8.FP8_DTYPE)
        return torch.empty(self.reader.reads[-1].shape, dtype=_fp8.FP8_DTYPE)
