"""Checkpoint reads planned instead of made: the recipe's own loader runs, every read is checked and recorded."""

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from torchtune_mistral3.checkpointing import HFCheckpointReader, _fp8
from torchtune_mistral3.checkpointing._source import TensorInfo, check_fp8_base, checked_block


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
        return math.prod(self.shape) * self.stored_dtype.itemsize


class PlannedReader:
    """Stands in for :class:`HFCheckpointReader` in a rehearsal: same index and checks, reads recorded, no bytes.

    ``read``, ``read_fp8`` and ``read_fp8_scale`` make the real reads' checks (block against the stored shape, a
    frozen FP8 base against what is stored), naming this rank, and return empty tensors of the block's shape in
    the wanted dtype (fake under the rehearsal's fake runtime). ``RawFP8Source`` over it plans the LoRA
    recipe's frozen FP8 base reads.

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

    def info(self, key: str) -> TensorInfo:
        """:meth:`HFCheckpointReader.info`, whose ``KeyError`` names this rank."""
        if key not in self.reader:
            raise KeyError(f"rank {self.rank}: checkpoint '{self.checkpoint_dir}' has no weight for '{key}'")
        return self.reader.info(key)

    @contextlib.contextmanager
    def _named(self) -> Iterator[None]:
        """Prefix this rank to the real reads' ``ValueError`` messages."""
        try:
            yield
        except ValueError as e:
            raise ValueError(f"rank {self.rank}: {e}") from None

    def _fp8_info(self, key: str) -> TensorInfo:
        """Where the frozen FP8 base weight ``key`` is stored, checked as the real read checks it."""
        info = self.info(key)
        with self._named():
            check_fp8_base(info)
        return info

    def _record(self, info: TensorInfo, key: str, offset, shape, dtype: torch.dtype) -> torch.Tensor:
        """Check and record one block read of ``key`` (stored as ``info``); an empty tensor of the block."""
        with self._named():
            offset, shape = checked_block(info, offset, shape)
        if dtype.is_floating_point and not info.dtype.is_floating_point:
            raise ValueError(f"rank {self.rank}: '{info.path}': '{info.hf_key}' is stored as {info.dtype}, which "
                             f"cannot become the {dtype} weight '{key}'")
        self.reads.append(PlannedRead(key, info.hf_key, info.path.name, offset, shape, info.dtype, dtype))
        return torch.empty(shape, dtype=dtype)

    def read(
        self,
        key: str,
        dtype: Optional[torch.dtype] = None,
        *,
        offset: Optional[Sequence[int]] = None,
        shape: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """:meth:`HFCheckpointReader.read`, recorded: an empty tensor of the block's shape and ``dtype``."""
        info = self.info(key)
        return self._record(info, key, offset, shape, dtype or (torch.float32 if info.is_fp8 else info.dtype))

    def read_fp8(
        self, key: str, *, offset: Optional[Sequence[int]] = None, shape: Optional[Sequence[int]] = None
    ) -> torch.Tensor:
        """:meth:`HFCheckpointReader.read_fp8`, recorded: an empty ``float8_e4m3fn`` tensor of the block's shape."""
        return self._record(self._fp8_info(key), key, offset, shape, _fp8.FP8_DTYPE)

    def read_fp8_scale(self, key: str) -> torch.Tensor:
        """:meth:`HFCheckpointReader.read_fp8_scale`, recorded: a 0-d fp32 tensor of ones."""
        info = self._fp8_info(key)
        scale = TensorInfo(info.scale_key, info.scale_path, torch.bfloat16, ())
        self._record(scale, key + _fp8.SCALE_SUFFIX, None, None, torch.float32)
        return torch.ones(())
