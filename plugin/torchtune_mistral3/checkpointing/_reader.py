"""Read a Hugging Face ``Mistral3ForConditionalGeneration`` checkpoint one tensor (or one slice) at a time.

Only the safetensors headers are parsed up front (they name every tensor, its dtype, shape and byte range),
so opening a 128B checkpoint costs a few MB. Values are read on demand with ``safe_open(...).get_slice``,
which copies just the requested rows/columns out of the file; FP8 weights are dequantised right after.
"""

import contextlib
import json
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import safe_open

from torchtune_mistral3.checkpointing import _fp8
from torchtune_mistral3.checkpointing._source import TensorInfo, check_fp8_base, checked_block
from torchtune_mistral3.models.mistral3._convert_weights import hf_key_to_tune

SAFETENSORS_INDEX = "model.safetensors.index.json"
CONFIG_FNAME = "config.json"

_ST_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# Keys some exporters write that carry no weight of the model.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")


def read_json(path: Union[str, Path]) -> Any:
    """A checkpoint's JSON file (``config.json``, the safetensors index), parsed.

    Args:
        path (Union[str, Path]): the file.

    Returns:
        Any: its content.

    Raises:
        ValueError: if it is not valid JSON, naming the file, the line and the column.
    """
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"'{path}' is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): the file is damaged or "
            "cut short; fix it or copy it again from the checkpoint's source"
        ) from e


def read_safetensors_header(path: Union[str, Path]) -> Dict[str, dict]:
    """Parse a safetensors header and check that the file holds every byte it declares.

    Args:
        path (Union[str, Path]): the ``.safetensors`` file.

    Returns:
        Dict[str, dict]: tensor name -> ``{"dtype", "shape", "data_offsets"}`` (``__metadata__`` removed).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the header is unreadable, or the file is shorter than its header says (a truncated
            download or an interrupted copy); the message names the file and the first tensor cut off.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file '{path}' does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"'{path}' is not a safetensors file: {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise ValueError(f"'{path}' is truncated: its header alone needs {8 + n} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"'{path}' has an unreadable safetensors header: {e}") from e
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][1]):
        end = meta["data_offsets"][1]
        if end > data_size:
            raise ValueError(
                f"'{path}' is truncated: tensor '{name}' ends at byte {end} of the data section but the file "
                f"holds only {data_size} data bytes; download or copy the file again"
            )
    return header


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Tuple[Any, bool]]:
    """Open a safetensors file for one read; yield the handle and whether its tensors own their memory.

    safetensors >= 0.8 can ``pread`` the requested bytes into fresh tensors. Older versions serve views of a
    private mmap (kept alive, and counted as resident, as long as the tensor lives); those get copied.
    The handle is closed right after the read, so no mapping of a multi-GB shard outlives it.
    """
    try:
        handle, owned = safe_open(path, framework="pt", backend="pread"), True
    except TypeError:
        handle, owned = safe_open(path, framework="pt"), False
    with handle as f:
        yield f, owned


def _checkpoint_files(checkpoint_dir: Path, checkpoint_files: Optional[Sequence[str]]) -> Dict[str, Path]:
    """Return ``hf_key -> file`` from an explicit file list, the sharded index, or every ``*.safetensors``."""
    index_path = checkpoint_dir / SAFETENSORS_INDEX
    if checkpoint_files is None and index_path.is_file():
        weight_map = read_json(index_path)["weight_map"]
        key_to_file = {k: checkpoint_dir / f for k, f in weight_map.items()}
        for key, path in key_to_file.items():
            if not path.is_file():
                raise FileNotFoundError(f"'{path}' is listed in '{index_path}' (for key '{key}') but does not exist")
        return key_to_file
    if checkpoint_files is None:
        files = sorted(checkpoint_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file and no {SAFETENSORS_INDEX} in '{checkpoint_dir}'")
    else:
        files = [checkpoint_dir / f for f in checkpoint_files]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint file '{path}' (from checkpoint_files) does not exist")
    key_to_file: Dict[str, Path] = {}
    for path in files:
        for key in read_safetensors_header(path):
            if key in key_to_file:
                raise ValueError(f"key '{key}' is stored twice: in '{key_to_file[key]}' and in '{path}'")
            key_to_file[key] = path
    return key_to_file


class HFCheckpointReader:
    """Index of a ``Mistral3ForConditionalGeneration`` checkpoint by plugin key, with on-demand reads.

    Accepts both HF key layouts (runtime ``model.language_model.*`` and legacy ``language_model.model.*``),
    bf16/fp32 tensors and FP8 E4M3 weights with a ``weight_scale_inv`` (per tensor, or per block when
    ``quantization_config.weight_block_size`` is set). ``activation_scale`` tensors are kept aside (they
    matter only to FP8 inference) and can be written back by the FP8 saver.

    Args:
        checkpoint_dir (Union[str, Path]): directory with ``config.json`` and the safetensors files.
        checkpoint_files (Optional[Sequence[str]]): file names inside ``checkpoint_dir``. Default is None:
            the keys of ``model.safetensors.index.json`` if present, else every ``*.safetensors`` file.
        ignore_unexpected_keys (Sequence[str]): regular expressions; a stored key that one matches from its
            start (``re.match`` on the HF key as stored, so an FP8 weight's pattern also drops its scales) is
            left out, as if the checkpoint did not have it. Default is none.

    Raises:
        FileNotFoundError: if ``config.json`` or a listed file is missing (the message names it).
        ValueError: for a truncated file, a key stored twice, an FP8 weight without its scale (or a scale
            without its weight), or a key that is no weight of the model (the message names file and key).
    """

    def __init__(
        self,
        checkpoint_dir: Union[str, Path],
        checkpoint_files: Optional[Sequence[str]] = None,
        ignore_unexpected_keys: Sequence[str] = (),
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        config_path = self.checkpoint_dir / CONFIG_FNAME
        if not config_path.is_file():
            raise FileNotFoundError(f"'{config_path}' does not exist; an HF checkpoint directory needs its config.json")
        self.config: dict = read_json(config_path)
        qcfg = self.config.get("quantization_config") or {}
        self.block_size: Optional[List[int]] = qcfg.get("weight_block_size")

        key_to_file = _checkpoint_files(self.checkpoint_dir, checkpoint_files)
        headers = {path: read_safetensors_header(path) for path in sorted(set(key_to_file.values()))}
        for key, path in key_to_file.items():
            if key not in headers[path]:
                raise ValueError(f"'{path}' does not contain key '{key}' that the index assigns to it")
        patterns = [re.compile(p) for p in ignore_unexpected_keys]
        #: HF keys left out because a pattern of ``ignore_unexpected_keys`` matched them.
        self.ignored_keys: List[str] = sorted(k for k in key_to_file if any(p.match(k) for p in patterns))
        for key in self.ignored_keys:
            del key_to_file[key]

        self._infos: Dict[str, TensorInfo] = {}
        self._activation_scales: Dict[str, Tuple[str, Path]] = {}
        scales = {k for k in key_to_file if k.endswith(_fp8.SCALE_SUFFIX)}
        for hf_key, path in key_to_file.items():
            if hf_key in scales or hf_key.endswith(_IGNORED_SUFFIXES):
                continue
            if hf_key.endswith("." + _fp8.ACTIVATION_SCALE_SUFFIX):
                weight = hf_key[: -len(_fp8.ACTIVATION_SCALE_SUFFIX)] + "weight"
                self._activation_scales[self._tune_key(weight, path)] = (hf_key, path)
                continue
            meta = headers[path][hf_key]
            dtype = _ST_DTYPES.get(meta["dtype"])
            if dtype is None:
                raise ValueError(f"'{path}': key '{hf_key}' has dtype {meta['dtype']}, which this loader cannot read")
            scale_key = _fp8.scale_key(hf_key)
            if dtype == _fp8.FP8_DTYPE and scale_key not in key_to_file:
                raise ValueError(f"'{path}': FP8 weight '{hf_key}' has no '{scale_key}' to dequantise it with")
            is_fp8 = scale_key in key_to_file
            tune_key = self._tune_key(hf_key, path)
            if tune_key in self._infos:
                raise ValueError(
                    f"'{path}': key '{hf_key}' and '{self._infos[tune_key].hf_key}' are the same weight "
                    "(the checkpoint mixes both HF key layouts)"
                )
            info = TensorInfo(
                hf_key=hf_key,
                path=path,
                dtype=dtype,
                shape=tuple(meta["shape"]),
                scale_key=scale_key if is_fp8 else None,
                scale_path=key_to_file[scale_key] if is_fp8 else None,
                scale_shape=tuple(headers[key_to_file[scale_key]][scale_key]["shape"]) if is_fp8 else None,
            )
            if is_fp8:
                self._check_scale(info, info.scale_shape)
            self._infos[tune_key] = info
        for scale in scales:
            if scale[: -len(_fp8.SCALE_SUFFIX)] not in key_to_file:
                raise ValueError(f"'{key_to_file[scale]}': scale '{scale}' has no weight next to it")

    @staticmethod
    def _tune_key(hf_key: str, path: Path) -> str:
        try:
            return hf_key_to_tune(hf_key)
        except KeyError as e:
            raise ValueError(
                f"'{path}': unexpected key '{hf_key}', which is no weight of Mistral3ForConditionalGeneration; "
                "pass checkpoint_files to leave that file out, or remove the key"
            ) from e

    def _check_scale(self, info: TensorInfo, scale_shape: Sequence[int]) -> None:
        if _fp8.is_per_tensor_scale(scale_shape):
            return
        if self.block_size is None:
            raise ValueError(
                f"'{info.scale_path}': '{info.scale_key}' has shape {list(scale_shape)}, a block scale, but "
                "config.json sets no quantization_config.weight_block_size, so the block layout is unknown"
            )
        bm, bn = self.block_size
        want = [-(-info.shape[0] // bm), -(-info.shape[1] // bn)]
        if list(scale_shape) != want:
            raise ValueError(
                f"'{info.scale_path}': '{info.scale_key}' has shape {list(scale_shape)}; a {info.shape} weight "
                f"with weight_block_size {self.block_size} needs {want}"
            )

    def keys(self) -> List[str]:
        """Return the plugin keys of every weight in the checkpoint, in file order.

        Returns:
            List[str]: plugin keys.
        """
        return list(self._infos)

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, key: str) -> TensorInfo:
        """Return where and how ``key`` (a plugin key) is stored.

        Args:
            key (str): plugin key.

        Returns:
            TensorInfo: file, HF key, dtype, shape and FP8 scale of the tensor.

        Raises:
            KeyError: if the checkpoint has no such weight (the message names the checkpoint directory).
        """
        if key not in self._infos:
            raise KeyError(f"'{self.checkpoint_dir}' has no weight for '{key}'")
        return self._infos[key]

    def fp8_keys(self) -> List[str]:
        """Return the plugin keys stored as FP8 in this checkpoint.

        Returns:
            List[str]: plugin keys.
        """
        return [k for k, info in self._infos.items() if info.is_fp8]

    def activation_scales(self) -> Dict[str, torch.Tensor]:
        """Read the static FP8 input scales (``activation_scale``), keyed by the plugin key of their weight.

        Returns:
            Dict[str, torch.Tensor]: plugin weight key -> scalar tensor, as stored.
        """
        out = {}
        for key, (hf_key, path) in self._activation_scales.items():
            with _open(path) as (f, _):
                out[key] = f.get_tensor(hf_key).clone()
        return out

    def read(
        self,
        key: str,
        dtype: Optional[torch.dtype] = None,
        *,
        offset: Optional[Sequence[int]] = None,
        shape: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """Read one weight, or the block ``[offset, offset + shape)`` of it, dequantising FP8 on the way.

        Args:
            key (str): plugin key.
            dtype (Optional[torch.dtype]): dtype of the result. Default is None: the stored dtype, and fp32 for
                FP8 weights (the exact product; casting it later rounds exactly once, as in transformers).
            offset (Optional[Sequence[int]]): start of the block in every dimension. Default is None (zeros).
            shape (Optional[Sequence[int]]): size of the block. Default is None (the whole tensor).

        Returns:
            torch.Tensor: a new CPU tensor that owns its memory (no view into the file).

        Raises:
            KeyError: if the checkpoint has no such weight.
            ValueError: if the block lies outside the stored tensor.
        """
        info = self.info(key)
        offset, shape = checked_block(info, offset, shape)
        value = self._read_stored(info, offset, shape)
        if info.is_fp8:
            with _open(info.scale_path) as (f, _):
                scale = f.get_tensor(info.scale_key)
            block = self.block_size if not _fp8.is_per_tensor_scale(scale.shape) else None
            return _fp8.dequantize(value, scale, dtype or torch.float32, block_size=block, offset=offset)
        if dtype is not None and value.dtype != dtype:
            value = value.to(dtype)
        return value

    def read_fp8(
        self, key: str, *, offset: Optional[Sequence[int]] = None, shape: Optional[Sequence[int]] = None
    ) -> torch.Tensor:
        """Read an FP8 weight (or a block of it) as its stored bytes, not dequantised: a frozen FP8 base's value.

        Args:
            key (str): plugin key.
            offset (Optional[Sequence[int]]): start of the block. Default is None (zeros).
            shape (Optional[Sequence[int]]): size of the block. Default is None (the whole tensor).

        Returns:
            torch.Tensor: a new ``float8_e4m3fn`` CPU tensor.
        """
        info = self.info(key)
        check_fp8_base(info)
        return self._read_stored(info, *checked_block(info, offset, shape))

    def read_fp8_scale(self, key: str) -> torch.Tensor:
        """Read the per-tensor scale (``weight_scale_inv``) of the FP8 weight ``key``, as stored, 0-d.

        Args:
            key (str): plugin key of the weight.

        Returns:
            torch.Tensor: the scale.
        """
        info = self.info(key)
        check_fp8_base(info)
        with _open(info.scale_path) as (f, _):
            return f.get_tensor(info.scale_key).clone().reshape(())

    @staticmethod
    def _read_stored(info: TensorInfo, offset: Tuple[int, ...], shape: Tuple[int, ...]) -> torch.Tensor:
        """The block as stored (FP8 bytes too), in memory of its own."""
        with _open(info.path) as (f, owned):
            if offset == (0,) * len(info.shape) and shape == info.shape:
                value = f.get_tensor(info.hf_key)
            else:
                value = f.get_slice(info.hf_key)[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
        # mmap results are (possibly strided) views of a private file mapping: copy into owned memory.
        return value if owned else value.clone(memory_format=torch.contiguous_format)

    def state_dict(self, dtype: Optional[torch.dtype] = None) -> "LazyStateDict":
        """Return a read-only mapping plugin key -> tensor that reads each tensor when it is looked up.

        Args:
            dtype (Optional[torch.dtype]): passed to :meth:`read`. Default is None.

        Returns:
            LazyStateDict: the lazy mapping.
        """
        return LazyStateDict(self, dtype)


class LazyStateDict(Mapping):
    """A state dict whose values are read (and dequantised) from the checkpoint on every lookup.

    Nothing is cached: iterating ``.items()`` holds one tensor at a time, so a loader that places each
    tensor before asking for the next (torchtune's ``load_from_full_model_state_dict`` does) never holds
    more than the largest tensor beyond the model itself.

    Args:
        reader (HFCheckpointReader): the checkpoint.
        dtype (Optional[torch.dtype]): passed to :meth:`HFCheckpointReader.read`. Default is None.
    """

    def __init__(self, reader: HFCheckpointReader, dtype: Optional[torch.dtype] = None) -> None:
        self.reader = reader
        self.dtype = dtype

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.reader.read(key, self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.reader.keys())

    def __len__(self) -> int:
        return len(self.reader)

    def __contains__(self, key: object) -> bool:
        return key in self.reader
