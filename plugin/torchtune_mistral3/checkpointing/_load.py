"""Load a checkpoint straight into a (possibly tensor-, pipeline- or FSDP-parallel) module, one slice at a time."""

from typing import Iterable, List, Optional, Union

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from torchtune_mistral3.checkpointing._reader import HFCheckpointReader
from torchtune_mistral3.checkpointing._source import TensorSource

_HEAD, _EMBEDDING = "decoder.output.weight", "decoder.tok_embeddings.weight"
_SHOWN = 8


def stores_real_lm_head(reader: TensorSource) -> bool:
    """Whether the checkpoint has an ``lm_head.weight`` of its own: stored, and not equal to ``embed_tokens``.

    transformers 5.x (``PreTrainedModel.tie_weights`` during ``from_pretrained``) ties the head to the
    embedding when the top-level ``tie_word_embeddings`` is true (the ``Mistral3Config`` default) unless the
    checkpoint holds both tensors with different values: then it keeps the real head and warns. This
    function answers that question for a checkpoint (it reads both tensors only when both are stored).

    Args:
        reader (TensorSource): the checkpoint.

    Returns:
        bool: True if the head is stored and differs from the token embedding.
    """
    if _HEAD not in reader:
        return False
    if _EMBEDDING not in reader or reader.info(_HEAD).shape != reader.info(_EMBEDDING).shape:
        return True
    return not torch.equal(reader.read(_HEAD), reader.read(_EMBEDDING))


def check_all_weights_read(reader: HFCheckpointReader, model_keys: Iterable[str]) -> None:
    """Raise if the checkpoint holds weights that no entry of the (whole) model's state dict reads.

    Call it with the keys of the full model (before pipeline stages are cut), so that under pipeline
    parallelism a weight another stage reads does not count as unread. FP8 scales, ``activation_scale`` and
    rotary ``inv_freq`` buffers never count (the reader consumes or drops them, as transformers does), nor
    do keys that ``ignore_unexpected_keys`` removed, nor a stored ``lm_head.weight`` equal to the embedding
    of a model that ties them (transformers ties those too).

    Args:
        reader (HFCheckpointReader): the checkpoint.
        model_keys (Iterable[str]): every state-dict key of the model (plugin keys).

    Raises:
        ValueError: listing the unread weights (HF keys), the checkpoint directory and the two ways out.
    """
    model_keys = set(model_keys)
    unread = [k for k in reader.keys() if k not in model_keys]
    if not unread:
        return
    hint = ""
    if _HEAD in unread and _EMBEDDING in model_keys:
        if not stores_real_lm_head(reader):
            unread.remove(_HEAD)
            if not unread:
                return
        else:
            hint = (
                f" '{reader.info(_HEAD).hf_key}' differs from the embedding but the model ties its output head to"
                " the embedding (transformers keeps such a head): build the model with tie_word_embeddings=False"
                " (mistral3_from_hf_config decides it from the checkpoint)."
            )
    hf_keys = [reader.info(k).hf_key for k in unread]
    shown = ", ".join(hf_keys[:_SHOWN]) + (f" ... ({len(hf_keys) - _SHOWN} more)" if len(hf_keys) > _SHOWN else "")
    raise ValueError(
        f"checkpoint '{reader.checkpoint_dir}' holds {len(hf_keys)} weights that no parameter of the model reads: "
        f"{shown}.{hint} Its config.json (e.g. num_hidden_layers) or the model builder describes a smaller model "
        "than the weights. Fix config.json or the model arguments, or, to drop these weights on purpose, set "
        "checkpointer.ignore_unexpected_keys to regular expressions matching them, e.g. "
        "checkpointer.ignore_unexpected_keys=['model\\.language_model\\.layers\\.1\\.']."
    )


def load_into_module(
    module: nn.Module,
    reader: TensorSource,
    dtype: Optional[torch.dtype] = None,
    strict: bool = True,
    device: Optional[Union[str, torch.device]] = None,
) -> List[str]:
    """Fill every entry of ``module.state_dict()`` from ``reader``, reading only what this rank holds.

    For a DTensor (tensor parallel ``Shard(0)``/``Shard(1)``, FSDP2 ``Shard(0)``, any mesh) only this rank's
    local block is read from the file (``safe_open(...).get_slice``) and dequantised; FP8 scales are per
    tensor, so dequantising a block gives exactly the block of the dequantised tensor. Keys are taken from
    the module, so a pipeline stage reads only its own layers, and the checkpoint's other keys are ignored.

    Parameters and buffers still on the ``meta`` device are created on ``device`` and swapped in with
    ``load_state_dict(..., assign=True)`` (no ``to_empty`` needed, ``requires_grad`` is kept); materialised
    ones are filled in place with ``copy_``, which keeps optimizer references valid. Non-persistent
    buffers (RoPE caches) are not in the state dict: the caller re-initialises them (``rope_init()``).

    Args:
        module (nn.Module): the model (or one pipeline stage of it), with plugin key names.
        reader (TensorSource): the checkpoint (or another source of the module's tensors).
        dtype (Optional[torch.dtype]): dtype to load as. Default is None: each tensor keeps the dtype it has
            in ``module``.
        strict (bool): raise if the module has a key the checkpoint lacks. Default is True.
        device (Optional[Union[str, torch.device]]): where tensors on ``meta`` are created. Default is None:
            the device type of a DTensor's mesh (current CUDA device for ``cuda``), else CPU.

    Returns:
        List[str]: module keys the checkpoint did not have (empty when ``strict``).

    Raises:
        KeyError: if ``strict`` and the checkpoint lacks keys of the module (all of them are named).
        ValueError: if a stored tensor's shape differs from the module's (file, key and both shapes named), or
            it holds NaN or inf values (file and key named).
    """
    state = module.state_dict()
    missing = [k for k in state if k not in reader]
    if missing and strict:
        raise KeyError(
            f"checkpoint '{reader.checkpoint_dir}' lacks {len(missing)} weights of the model: {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}; check that config.json and the model builder describe "
            "the same architecture"
        )
    assigned = {}
    for key, target in state.items():
        if key not in reader:
            continue
        info = reader.info(key)
        if tuple(target.shape) != info.shape:
            raise ValueError(
                f"'{info.path}': '{info.hf_key}' has shape {list(info.shape)} but the model's '{key}' has "
                f"shape {list(target.shape)}; config.json does not match this checkpoint or the model"
            )
        if isinstance(target, DTensor):
            local = target.to_local()
            shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
        else:
            local, shape, offset = target, tuple(target.shape), (0,) * target.dim()
        want = dtype or local.dtype
        if local.numel() == 0:
            value = torch.empty(shape, dtype=want)
        else:
            value = reader.read(key, want, offset=offset, shape=shape)
            bad = _non_finite(value)
            if bad:  # else the first step reports a non-finite loss and blames the learning rate
                raise ValueError(
                    f"'{info.path}': '{info.hf_key}' holds {bad} non-finite values (NaN or inf) in the part this "
                    f"rank reads: the input checkpoint '{reader.checkpoint_dir}' is damaged; re-download or re-export "
                    "it"
                )
        if not local.is_meta:
            with torch.no_grad():
                local.copy_(value)
            continue
        value = value.to(_target_device(target, device))
        if isinstance(target, DTensor):
            mesh, placements = target.device_mesh, target.placements
            value = DTensor.from_local(
                value, mesh, placements, run_check=False, shape=target.shape, stride=target.stride()
            )
        assigned[key] = value
    if assigned:
        module.load_state_dict(assigned, strict=False, assign=True)
    return missing


def _non_finite(value: torch.Tensor) -> int:
    """How many NaN or inf elements ``value`` holds (raw FP8 bytes too, whose NaN torch's isfinite cannot see)."""
    if not value.is_floating_point():
        return 0
    wide = value.float() if value.element_size() == 1 else value
    return int((~torch.isfinite(wide)).sum())


def _target_device(target: torch.Tensor, device: Optional[Union[str, torch.device]]) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(target, DTensor):
        kind = target.device_mesh.device_type
        if kind == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(kind)
    return torch.device("cpu")
