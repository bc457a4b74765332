"""A view of a checkpoint that hands out FP8 weights as their stored bytes and scales, not dequantised.

:func:`~torchtune_mistral3.checkpointing.load_into_module` asks its source for each state dict entry in the
module's own dtype. Through :class:`RawFP8Source`, an entry that is ``float8_e4m3fn`` in the module (a frozen
FP8 base weight, :class:`~torchtune_mistral3.peft.FrozenFP8Linear`) gets the checkpoint's FP8 bytes (only
this rank's block of them), and its ``<linear>.weight_scale_inv`` buffer gets the per-tensor scale; every
other entry is read (and dequantised if needed) by the reader as usual.
"""

from typing import Optional, Sequence

import torch

from torchtune_mistral3.checkpointing import _fp8
from torchtune_mistral3.checkpointing._reader import HFCheckpointReader
from torchtune_mistral3.checkpointing._source import TensorInfo


class RawFP8Source:
    """A :class:`TensorSource` over a checkpoint reader for :func:`load_into_module` that keeps FP8 weights in FP8.

    The reader gives the bytes (``read_fp8``) and scales (``read_fp8_scale``): :class:`HFCheckpointReader` from
    the files, the rehearsal's planned reader by recording the reads.

    Args:
        reader (HFCheckpointReader): the checkpoint.
    """

    def __init__(self, reader: HFCheckpointReader) -> None:
        self.reader = reader
        self.checkpoint_dir = reader.checkpoint_dir

    def _weight_of_scale(self, key: str) -> Optional[str]:
        """The FP8 weight whose scale ``key`` names, or None."""
        if not key.endswith(_fp8.SCALE_SUFFIX):
            return None
        weight = key[: -len(_fp8.SCALE_SUFFIX)]
        return weight if weight in self.reader and self.reader.info(weight).is_fp8 else None

    def __contains__(self, key: object) -> bool:
        return key in self.reader or (isinstance(key, str) and self._weight_of_scale(key) is not None)

    def info(self, key: str) -> TensorInfo:
        """Return where ``key`` is stored; a scale is described as the 0-d tensor the module holds.

        Args:
            key (str): plugin key (a weight, or ``<linear>.weight_scale_inv``).

        Returns:
            TensorInfo: its file, HF key, dtype and shape.
        """
        weight = self._weight_of_scale(key)
        if weight is None:
            return self.reader.info(key)
        info = self.reader.info(weight)
        return TensorInfo(hf_key=info.scale_key, path=info.scale_path, dtype=torch.float32, shape=())

    def read(
        self,
        key: str,
        dtype: Optional[torch.dtype] = None,
        *,
        offset: Optional[Sequence[int]] = None,
        shape: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """Read ``key`` (or a block of it): FP8 bytes when ``dtype`` is FP8, the scale for a scale key.

        Args:
            key (str): plugin key.
            dtype (Optional[torch.dtype]): the module's dtype for this entry.
            offset (Optional[Sequence[int]]): start of the block. Default is None (zeros).
            shape (Optional[Sequence[int]]): size of the block. Default is None (the whole tensor).

        Returns:
            torch.Tensor: a new CPU tensor.

        Raises:
            ValueError: if the module wants FP8 but the checkpoint stores ``key`` unquantised or block-scaled
                (the message names the key and the switch to use), or the block is out of range.
        """
        weight = self._weight_of_scale(key)
        if weight is not None:
            scale = self.reader.read_fp8_scale(weight)
            return scale.to(dtype) if dtype is not None else scale
        if dtype != _fp8.FP8_DTYPE:
            return self.reader.read(key, dtype, offset=offset, shape=shape)
        return self.reader.read_fp8(key, offset=offset, shape=shape)
