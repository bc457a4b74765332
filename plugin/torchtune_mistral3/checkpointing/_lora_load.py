"""Load a LoRA model: the base from the checkpoint (FP8 bases as stored), the adapters freshly initialised.

Adapters are initialised from the seed and their state dict key alone, on the full tensor, and each rank
takes its block: every parallel layout (one process, FSDP over any number of ranks) starts from the same
adapters, so their losses agree from the first step.
"""

import math
import zlib
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch import nn

from torchtune_mistral3.checkpointing._fp8_raw import RawFP8Source
from torchtune_mistral3.checkpointing._load import load_into_module
from torchtune_mistral3.checkpointing._reader import HFCheckpointReader
from torchtune_mistral3.checkpointing._source import TensorInfo, checked_block
from torchtune_mistral3.peft._fp8_lora import SCALE_NAME, FrozenFP8Linear

_ADAPTER_SUFFIXES = ("lora_a.weight", "lora_b.weight")


class AdapterInit:
    """A :class:`TensorSource` that gives LoRA ``A`` (Kaiming-uniform, as torchtune) and ``B = 0``.

    ``A[key] ~ U(-1/sqrt(in_dim), 1/sqrt(in_dim))`` drawn from ``seed`` and the CRC32 of ``key``; blocks are cut
    from the full tensor, so a rank's block does not depend on how the tensor is sharded.

    Args:
        shapes (dict): adapter state dict key -> full shape.
        seed (int): the run's seed.
    """

    def __init__(self, shapes: dict, seed: int) -> None:
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.seed = seed
        self.checkpoint_dir = "<LoRA initialisation>"

    def __contains__(self, key: object) -> bool:
        return key in self.shapes

    def info(self, key: str) -> TensorInfo:
        """:meth:`TensorSource.info`: the adapter's full shape (fp32, stored in no file)."""
        return TensorInfo(hf_key=key, path=Path(self.checkpoint_dir), dtype=torch.float32, shape=self.shapes[key])

    def read(
        self,
        key: str,
        dtype: Optional[torch.dtype] = None,
        *,
        offset: Optional[Sequence[int]] = None,
        shape: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """The initial value of ``key`` (or of its block).

        Args:
            key (str): adapter key.
            dtype (Optional[torch.dtype]): result dtype. Default is None (fp32).
            offset (Optional[Sequence[int]]): block start. Default is None (zeros).
            shape (Optional[Sequence[int]]): block size. Default is None (the whole tensor).

        Returns:
            torch.Tensor: a new CPU tensor.
        """
        offset, shape = checked_block(self.info(key), offset, shape)
        full = self.shapes[key]
        if key.endswith("lora_b.weight"):
            value = torch.zeros(full)
        else:
            bound = 1.0 / math.sqrt(full[1])
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
            value = torch.empty(full).uniform_(-bound, bound, generator=g)
        part = value[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
        return part.to(dtype or torch.float32).contiguous()


def adapter_keys(module: nn.Module) -> List[str]:
    """State dict keys of the LoRA adapters in ``module``.

    Args:
        module (nn.Module): the model (or one stage of it).

    Returns:
        List[str]: keys ending in ``lora_a.weight`` / ``lora_b.weight``.
    """
    return [k for k in module.state_dict() if k.endswith(_ADAPTER_SUFFIXES)]


def load_lora_checkpoint(module: nn.Module, reader: HFCheckpointReader, *, dtype: torch.dtype, seed: int) -> None:
    """Fill a (possibly FSDP-sharded) LoRA model: base weights from ``reader``, adapters initialised.

    Frozen FP8 base weights get the checkpoint's FP8 bytes and per-tensor scale (:class:`RawFP8Source`);
    a scale that the compute dtype holds exactly is then kept in that dtype, so the per-step dequantisation
    multiplies in the compute dtype with the same result.

    Args:
        module (nn.Module): the LoRA model (or one pipeline stage), built in ``dtype``, on ``meta`` or empty.
        reader (HFCheckpointReader): the base checkpoint.
        dtype (torch.dtype): the compute dtype.
        seed (int): seed of the adapters' initialisation.

    Raises:
        KeyError: if the checkpoint lacks a base weight of the model (all of them named).
    """
    missing = load_into_module(module, RawFP8Source(reader), dtype=None, strict=False)
    lacking = [k for k in missing if not k.endswith(_ADAPTER_SUFFIXES)]
    if lacking:
        raise KeyError(
            f"checkpoint '{reader.checkpoint_dir}' lacks {len(lacking)} base weights of the LoRA model: {lacking[:8]}"
            f"{' ...' if len(lacking) > 8 else ''}; check that config.json and the model builder describe the same "
            "architecture"
        )
    state = module.state_dict()
    shapes = {k: tuple(state[k].shape) for k in missing}
    load_into_module(module, AdapterInit(shapes, seed), dtype=None, strict=False)
    for m in module.modules():
        if isinstance(m, FrozenFP8Linear):
            scale = getattr(m, SCALE_NAME)
            if scale.dtype != dtype and torch.equal(scale.to(dtype).to(scale.dtype), scale):
                m.register_buffer(SCALE_NAME, scale.to(dtype))
