"""Write HF safetensors checkpoints that ``transformers`` loads, atomically, from one rank or from many.

A checkpoint is written into a hidden sibling directory (``.<name>.partial``) and renamed into place only
when every file is complete, so a crash mid-save leaves the previous checkpoint as it was.

Shards are planned before any tensor is materialised (every tensor's output size is known from its
shape), so file names (``model-00001-of-00004.safetensors``) and contents do not depend on how the
model is split across ranks: a distributed save of a tensor-/FSDP-parallel model produces the same
bytes as a single-process save of the same weights.
"""

import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from torchtune_mistral3.checkpointing import _fp8
from torchtune_mistral3.checkpointing._hf_export import write_hf_processor_files
from torchtune_mistral3.checkpointing._reader import CONFIG_FNAME, SAFETENSORS_INDEX
from torchtune_mistral3.models.mistral3._convert_weights import tune_key_to_hf

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

# Files that make an output directory a usable checkpoint besides the weights (tokenizer, processor, chat
# template, generation defaults). ``params.json`` (Mistral's native layout) is left out on purpose: next to
# HF weights it would make vLLM pick the native loader.
_ASSET_PATTERNS = (
    "tekken.json",
    "tokenizer*",
    "special_tokens_map.json",
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template*",
    "generation_config.json",
)

# The text linears Mistral quantises, used when an FP8 save starts from a checkpoint that had no FP8.
_FP8_KEY = re.compile(r"decoder\.layers\.\d+\.(attn\.(q|k|v|output)_proj|mlp\.w[123])\.weight")

_DEFAULT_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "activation_scheme": "static",
    "weight_block_size": None,
    "dequantize": False,
    "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
}


def default_fp8_keys(keys: Iterable[str]) -> List[str]:
    """Return the keys Mistral stores as FP8: every decoder layer's attention and MLP projection weight.

    Args:
        keys (Iterable[str]): plugin keys.

    Returns:
        List[str]: the subset to quantise.
    """
    return [k for k in keys if _FP8_KEY.fullmatch(k)]


def saved_config(source_config: dict, *, fp8: bool, dtype: Optional[torch.dtype]) -> dict:
    """Return the ``config.json`` to write next to saved weights.

    Args:
        source_config (dict): the config of the checkpoint that was loaded.
        fp8 (bool): whether the weights are saved as per-tensor FP8.
        dtype (Optional[torch.dtype]): dtype of the unquantised tensors; None leaves the field alone.

    Returns:
        dict: the new config; ``quantization_config`` is dropped for a plain save, and set to per-tensor
        static FP8 (``weight_block_size: null``) for an FP8 save.
    """
    config = json.loads(json.dumps(source_config))
    if fp8:
        qcfg = dict(config.get("quantization_config") or _DEFAULT_QUANTIZATION_CONFIG)
        qcfg.update(quant_method="fp8", weight_block_size=None, dequantize=False)
        config["quantization_config"] = qcfg
    else:
        config.pop("quantization_config", None)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    return config


class ShardPlan:
    """Which output tensors go to which file, decided from shapes alone.

    Args:
        sizes (Sequence[Tuple[str, int]]): plugin key and output bytes, in save order.
        max_shard_bytes (int): a file is closed before it would exceed this (a larger single tensor gets a
            file of its own).
    """

    def __init__(self, sizes: Sequence[Tuple[str, int]], max_shard_bytes: int) -> None:
        self.files: List[List[str]] = []
        self.nbytes = 0
        current, current_bytes = [], 0
        for key, n in sizes:
            if current and current_bytes + n > max_shard_bytes:
                self.files.append(current)
                current, current_bytes = [], 0
            current.append(key)
            current_bytes += n
            self.nbytes += n
        if current:
            self.files.append(current)


def shard_name(index: int, total: int) -> str:
    """Return the HF name of shard ``index`` (0-based) of ``total``: ``model-00001-of-00004.safetensors``."""
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


class _HFTensorConverter:
    """Turns one plugin tensor into the HF tensors that represent it (a weight, or FP8 weight + scales)."""

    def __init__(
        self,
        dtype: Optional[torch.dtype],
        fp8_keys: Iterable[str] = (),
        activation_scales: Optional[Dict[str, torch.Tensor]] = None,
    ) -> None:
        self.dtype = dtype
        self.fp8_keys = set(fp8_keys)
        self.activation_scales = activation_scales or {}

    def nbytes(self, key: str, shape: Sequence[int], dtype: torch.dtype) -> int:
        numel = 1
        for d in shape:
            numel *= d
        if key in self.fp8_keys:
            extra = self.activation_scales[key].element_size() if key in self.activation_scales else 0
            return numel + 2 + extra
        return numel * (self.dtype or dtype).itemsize

    def convert(self, key: str, tensor: torch.Tensor) -> Dict[str, torch.Tensor]:
        hf_key = tune_key_to_hf(key)
        # Cast / quantise where the tensor lives (a GPU does it faster), then move the smaller result.
        tensor = tensor.detach()
        if key not in self.fp8_keys:
            return {hf_key: tensor.to(self.dtype or tensor.dtype).to("cpu").contiguous()}
        q, scale = _fp8.quantize_per_tensor(tensor)
        out = {hf_key: q.to("cpu"), _fp8.scale_key(hf_key): scale.to("cpu")}
        if key in self.activation_scales:
            out[_fp8.activation_scale_key(hf_key)] = self.activation_scales[key].clone()
        return out


class _ShardWriter:
    """Collects converted tensors and writes each planned file as soon as its last tensor arrives."""

    def __init__(self, directory: Path, files: List[List[str]], first_index: int, total: int, converter) -> None:
        self.directory = directory
        self.converter = converter
        self.weight_map: Dict[str, str] = {}
        self._file_of = {}
        self._pending: List[Dict[str, torch.Tensor]] = []
        self._remaining: List[int] = []
        self._names: List[str] = []
        for i, keys in enumerate(files):
            self._names.append(shard_name(first_index + i, total))
            self._pending.append({})
            self._remaining.append(len(keys))
            for k in keys:
                self._file_of[k] = i

    def add(self, key: str, tensor: torch.Tensor) -> None:
        i = self._file_of[key]
        for hf_key, value in self.converter.convert(key, tensor).items():
            self._pending[i][hf_key] = value
            self.weight_map[hf_key] = self._names[i]
        self._remaining[i] -= 1
        if self._remaining[i] == 0:
            path = self.directory / self._names[i]
            try:
                save_file(self._pending[i], path, metadata={"format": "pt"})
            except (OSError, SafetensorError) as e:  # a full disk: "No space left on device (os error 28)"
                raise OSError(f"{path}: {type(e).__name__}: {e}") from e
            os.chmod(path, _FILE_MODE)  # safetensors creates 0600: readable by colleagues as the other files
            self._pending[i] = {}

    def check_done(self) -> None:
        left = [n for n, r in zip(self._names, self._remaining) if r]
        if left:
            raise RuntimeError(f"internal error: shards {left} did not receive all their tensors")


def _file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def _failed_save(checkpoint_dir: Path, tmp: Path, errors: Sequence[str]) -> OSError:
    """Remove the partial copy and say which file failed and what is intact."""
    shutil.rmtree(tmp, ignore_errors=True)
    kept = (
        f"the previous checkpoint '{checkpoint_dir}' is intact" if checkpoint_dir.exists()
        else f"'{checkpoint_dir}' was not created; every earlier checkpoint is intact"
    )
    return OSError(
        f"Writing the checkpoint '{checkpoint_dir}' failed (is the disk full?): {'; '.join(errors)}. The partial "
        f"directory {tmp} was removed and {kept}; free space under {checkpoint_dir.parent} and save again (the "
        "training states under output_dir/training_state resume the run)."
    )


def _partial_dir(checkpoint_dir: Path) -> Path:
    return checkpoint_dir.parent / f".{checkpoint_dir.name}.partial"


def _prepare_partial(checkpoint_dir: Path) -> Path:
    tmp = _partial_dir(checkpoint_dir)
    if tmp.exists():  # left over from a save that crashed
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, checkpoint_dir: Path) -> None:
    """Rename the finished ``tmp`` to ``checkpoint_dir``, replacing an older checkpoint of the same name."""
    if checkpoint_dir.exists():
        old = checkpoint_dir.parent / f".{checkpoint_dir.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.rename(checkpoint_dir, old)
        os.rename(tmp, checkpoint_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, checkpoint_dir)


def _write_metadata(
    tmp: Path,
    weight_map: Dict[str, str],
    total_size: int,
    config: dict,
    source_dir: Optional[Path],
    max_image_size: Optional[int] = None,
) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    if "lm_head.weight" in weight_map and config.get("tie_word_embeddings", True):
        # a real head under a tying flag: transformers keeps it (with a warning), so say what the files hold
        config = {**config, "tie_word_embeddings": False}
    (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (tmp / CONFIG_FNAME).write_text(json.dumps(config, indent=2) + "\n")
    if source_dir is not None:
        for pattern in _ASSET_PATTERNS:
            for src in sorted(Path(source_dir).glob(pattern)):
                if src.is_file():
                    shutil.copy2(src, tmp / src.name)
    write_hf_processor_files(tmp, config=config, max_image_size=max_image_size)


def write_hf_checkpoint(
    state_dict: Dict[str, torch.Tensor],
    checkpoint_dir: Union[str, Path],
    *,
    config: dict,
    source_dir: Optional[Union[str, Path]] = None,
    dtype: Optional[torch.dtype] = torch.bfloat16,
    fp8_keys: Iterable[str] = (),
    activation_scales: Optional[Dict[str, torch.Tensor]] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    max_image_size: Optional[int] = None,
) -> Path:
    """Write a full plugin state dict (on this process) as an HF checkpoint directory, atomically.

    Tensors are converted and written one shard at a time, so besides ``state_dict`` itself at most one
    shard's worth of converted tensors is held.

    Args:
        state_dict (Dict[str, torch.Tensor]): plugin keys to full tensors.
        checkpoint_dir (Union[str, Path]): the directory to create (replaced if it exists).
        config (dict): the source ``config.json``; rewritten by :func:`saved_config`.
        source_dir (Optional[Union[str, Path]]): where to copy tokenizer/processor files from. Default is None.
        dtype (Optional[torch.dtype]): dtype of unquantised tensors; None keeps each tensor's. Default is bf16.
        fp8_keys (Iterable[str]): plugin keys to save as per-tensor FP8. Default is none.
        activation_scales (Optional[Dict[str, torch.Tensor]]): ``activation_scale`` to write next to FP8
            weights, by plugin weight key. Default is None.
        max_shard_bytes (int): size bound of one file. Default is 5 GiB.
        max_image_size (Optional[int]): the training transform's longest image edge, for the exported
            image-processor config (see ``_hf_export.py``); None takes the vision tower's. Default is None.

    Returns:
        Path: ``checkpoint_dir``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    converter = _HFTensorConverter(dtype, fp8_keys, activation_scales)
    plan = ShardPlan([(k, converter.nbytes(k, v.shape, v.dtype)) for k, v in state_dict.items()], max_shard_bytes)
    tmp = _prepare_partial(checkpoint_dir)
    try:
        writer = _ShardWriter(tmp, plan.files, 0, len(plan.files), converter)
        for key, value in state_dict.items():
            writer.add(key, value)
        writer.check_done()
        cfg = saved_config(config, fp8=bool(converter.fp8_keys), dtype=dtype)
        _write_metadata(tmp, writer.weight_map, plan.nbytes, cfg, source_dir, max_image_size)
    except OSError as e:
        raise _failed_save(checkpoint_dir, tmp, [str(e)]) from e
    _publish(tmp, checkpoint_dir)
    return checkpoint_dir


def save_distributed(
    module: Union[nn.Module, Sequence[nn.Module]],
    checkpoint_dir: Union[str, Path],
    *,
    config: dict,
    source_dir: Optional[Union[str, Path]] = None,
    mesh: Optional["torch.distributed.device_mesh.DeviceMesh"] = None,
    pp_dim: str = "pp",
    dtype: Optional[torch.dtype] = torch.bfloat16,
    fp8_keys: Optional[Iterable[str]] = None,
    activation_scales: Optional[Dict[str, torch.Tensor]] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    max_image_size: Optional[int] = None,
) -> Path:
    """Save a parallelised model as one HF checkpoint, each pipeline stage writing its own files.

    Call it on every rank. Per tensor of ``module.state_dict()`` (this rank's stage only), the ranks that
    share the tensor gather it (``DTensor.full_tensor()``, a collective within the tensor's own mesh, one
    tensor at a time); one rank per stage (coordinate 0 on every mesh dim but ``pp_dim``) converts it and
    writes each shard file as soon as it is complete. No rank ever holds the whole model, and there is no
    collective across stages except one metadata exchange and two barriers. Rank 0 then writes the index,
    ``config.json`` and tokenizer files and renames the directory into place.

    Args:
        module (Union[nn.Module, Sequence[nn.Module]]): the model, or this rank's pipeline stage(s) (a list
            when a rank holds several virtual stages), plugin key names.
        checkpoint_dir (Union[str, Path]): the directory to create (replaced if it exists); must be on a
            file system every writer sees.
        config (dict): the source ``config.json``.
        source_dir (Optional[Union[str, Path]]): where to copy tokenizer/processor files from. Default is None.
        mesh (Optional[DeviceMesh]): the world mesh. Default is None: one stage, rank 0 writes.
        pp_dim (str): name of the pipeline dimension of ``mesh`` (absent means one stage). Default is "pp".
        dtype (Optional[torch.dtype]): dtype of unquantised tensors; None keeps each tensor's. Default is bf16.
        fp8_keys (Optional[Iterable[str]]): keys to save as per-tensor FP8. Default is None (no FP8).
        activation_scales (Optional[Dict[str, torch.Tensor]]): ``activation_scale`` per FP8 weight key.
            Default is None.
        max_shard_bytes (int): size bound of one file. Default is 5 GiB.
        max_image_size (Optional[int]): the training transform's longest image edge, for the exported
            image-processor config (see ``_hf_export.py``); None takes the vision tower's. Default is None.

    Returns:
        Path: ``checkpoint_dir``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    stage, is_writer = _stage_role(mesh, pp_dim, rank)
    converter = _HFTensorConverter(dtype, fp8_keys or (), activation_scales)
    state: Dict[str, torch.Tensor] = {}
    for part in [module] if isinstance(module, nn.Module) else module:
        for key, value in part.state_dict().items():
            state.setdefault(key, value)
    plan = ShardPlan([(k, converter.nbytes(k, v.shape, v.dtype)) for k, v in state.items()], max_shard_bytes)

    # Every stage must know how many files the earlier stages write, to number its own.
    mine = (stage, is_writer, plan.files, plan.nbytes)
    if distributed:
        everyone: List = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    stages = {s: (files, n) for s, w, files, n in everyone if w}
    first = sum(len(stages[s][0]) for s in stages if s < stage)
    total = sum(len(files) for files, _ in stages.values())

    tmp = _partial_dir(checkpoint_dir)
    if rank == 0:
        _prepare_partial(checkpoint_dir)
    if distributed:
        dist.barrier()
    writer = _ShardWriter(tmp, plan.files, first, total, converter) if is_writer else None
    error = None
    for key, value in state.items():
        full = value.full_tensor() if isinstance(value, DTensor) else value  # a collective: every rank goes on
        if writer is not None and error is None:
            try:
                writer.add(key, full)
            except OSError as e:
                error = str(e)
        del full
    if writer is not None and error is None:
        writer.check_done()
    errors = [error]
    if distributed:
        dist.all_gather_object(errors := [None] * dist.get_world_size(), error)
    if any(errors):
        raise _failed_save(checkpoint_dir, tmp, [e for e in errors if e])
    if rank == 0:
        weight_map, offset = {}, 0
        for s in sorted(stages):
            files = stages[s][0]
            for i, keys in enumerate(files):
                for key in keys:
                    for hf_key in _hf_keys(key, converter):
                        weight_map[hf_key] = shard_name(offset + i, total)
            offset += len(files)
        nbytes = sum(n for _, n in stages.values())
        cfg = saved_config(config, fp8=bool(converter.fp8_keys), dtype=dtype)
        try:
            _write_metadata(tmp, weight_map, nbytes, cfg, source_dir, max_image_size)
        except OSError as e:
            raise _failed_save(checkpoint_dir, tmp, [str(e)]) from e
        _publish(tmp, checkpoint_dir)
    if distributed:
        dist.barrier()
    return checkpoint_dir


def _hf_keys(key: str, converter: _HFTensorConverter) -> List[str]:
    hf_key = tune_key_to_hf(key)
    if key not in converter.fp8_keys:
        return [hf_key]
    out = [hf_key, _fp8.scale_key(hf_key)]
    if key in converter.activation_scales:
        out.append(_fp8.activation_scale_key(hf_key))
    return out


def _stage_role(mesh, pp_dim: str, rank: int) -> Tuple[int, bool]:
    """Return (pipeline stage of this rank, whether it writes that stage's files)."""
    if mesh is None:
        return 0, rank == 0
    names = mesh.mesh_dim_names or tuple(str(i) for i in range(mesh.ndim))
    coords = dict(zip(names, mesh.get_coordinate()))
    stage = coords.pop(pp_dim, 0)
    return stage, all(c == 0 for c in coords.values())
