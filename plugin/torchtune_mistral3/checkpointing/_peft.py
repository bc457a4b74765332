"""LoRA adapters out in the PEFT format, and the merged model as an HF checkpoint.

The adapter directory holds ``adapter_config.json`` + ``adapter_model.safetensors`` with the keys and target
modules that ``peft`` uses for transformers' ``Mistral3ForConditionalGeneration``
(``base_model.model.<HF module>.lora_A.weight`` / ``lora_B.weight``, runtime key layout), so
``PeftModel.from_pretrained(Mistral3ForConditionalGeneration.from_pretrained(base), adapter_dir)`` gives the
trained model. The merged checkpoint has ``W + (alpha / rank) B A`` in place of each adapted weight (FP8 bases
dequantised first) and loads with ``Mistral3ForConditionalGeneration.from_pretrained``.
"""

import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from torchtune_mistral3.checkpointing import _fp8
from torchtune_mistral3.checkpointing._writer import write_hf_checkpoint
from torchtune_mistral3.models.mistral3._convert_weights import tune_key_to_hf

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_A, _B = ".lora_a.weight", ".lora_b.weight"


def _hf_module(tune_module: str) -> str:
    """HF module name (runtime layout) of a plugin linear, e.g. ``model.language_model.layers.0.self_attn.q_proj``."""
    return tune_key_to_hf(tune_module + ".weight")[: -len(".weight")]


def peft_key(tune_key: str) -> str:
    """PEFT's saved key for a plugin adapter key (``...q_proj.lora_a.weight`` -> ``base_model.model...lora_A.weight``).

    Args:
        tune_key (str): a plugin key ending in ``lora_a.weight`` or ``lora_b.weight``.

    Returns:
        str: the key in ``adapter_model.safetensors``.

    Raises:
        ValueError: if ``tune_key`` is no adapter key.
    """
    for suffix, name in ((_A, "lora_A"), (_B, "lora_B")):
        if tune_key.endswith(suffix):
            return f"base_model.model.{_hf_module(tune_key[: -len(suffix)])}.{name}.weight"
    raise ValueError(f"'{tune_key}' is not a LoRA adapter key (lora_a.weight / lora_b.weight)")


def peft_target_modules(tune_modules: List[str]) -> str:
    r"""A regular expression that matches exactly the HF modules carrying adapters (PEFT ``re.fullmatch``es it).

    Args:
        tune_modules (List[str]): plugin names of the adapted linears.

    Returns:
        str: an alternation of the escaped HF module names with layer numbers folded into ``\d+``.
    """
    patterns = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(_hf_module(m))) for m in tune_modules})
    return "(" + "|".join(patterns) + ")"


def adapter_config(
    tune_modules: List[str], *, rank: int, alpha: float, dropout: float, base_model_name_or_path: Optional[str]
) -> Dict:
    """The ``adapter_config.json`` of a plain LoRA adapter (PEFT ``LoraConfig`` fields).

    Args:
        tune_modules (List[str]): plugin names of the adapted linears.
        rank (int): LoRA rank (``r``).
        alpha (float): ``lora_alpha``.
        dropout (float): ``lora_dropout``.
        base_model_name_or_path (Optional[str]): the base checkpoint.

    Returns:
        Dict: the config.
    """
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": peft_target_modules(tune_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def lora_modules(module: nn.Module) -> Dict[str, nn.Module]:
    """The adapted linears of ``module`` by plugin name (modules with ``lora_a`` and ``lora_b``).

    Args:
        module (nn.Module): the LoRA model.

    Returns:
        Dict[str, nn.Module]: name -> module.
    """
    return {n: m for n, m in module.named_modules() if hasattr(m, "lora_a") and hasattr(m, "lora_b")}


def lora_hyperparameters(module: nn.Module) -> Tuple[int, float, float]:
    """Rank, alpha and dropout shared by every adapter of ``module``.

    Args:
        module (nn.Module): the LoRA model.

    Returns:
        Tuple[int, float, float]: ``(rank, alpha, dropout)``.

    Raises:
        ValueError: if the model has no adapters, or adapters with different rank/alpha/dropout.
    """
    found = set()
    for m in lora_modules(module).values():
        found.add((int(m.rank), float(m.alpha), float(getattr(m.dropout, "p", 0.0))))
    if len(found) != 1:
        raise ValueError(f"expected adapters of one rank/alpha/dropout, found {sorted(found) or 'no adapters'}")
    return found.pop()


def _full_tensors(module: nn.Module, keys: Optional[List[str]] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(key, full CPU tensor)`` for ``module``'s state dict (all ranks must call; DTensors gathered)."""
    state = module.state_dict()
    for key in keys if keys is not None else list(state):
        value = state[key]
        if isinstance(value, DTensor) and value.dtype == _fp8.FP8_DTYPE:
            # gloo (and some NCCL builds) cannot all-gather float8: move the same bytes as uint8
            as_bytes = DTensor.from_local(
                value.to_local().view(torch.uint8),
                value.device_mesh,
                value.placements,
                run_check=False,
                shape=value.shape,
                stride=value.stride(),
            )
            value = as_bytes.full_tensor().view(_fp8.FP8_DTYPE)
        elif isinstance(value, DTensor):
            value = value.full_tensor()
        yield key, value.detach().cpu()


def _write_atomically(directory: Path, files: Dict[str, callable]) -> None:
    tmp = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, write in files.items():
        write(tmp / name)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def save_peft_adapter(
    module: nn.Module,
    directory: Union[str, Path],
    *,
    base_model_name_or_path: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
) -> Optional[Path]:
    """Write the adapters of a (possibly FSDP-sharded) LoRA model as a PEFT adapter directory; call on every rank.

    Args:
        module (nn.Module): the LoRA model (whole, not a pipeline stage).
        directory (Union[str, Path]): the adapter directory (replaced if it exists).
        base_model_name_or_path (Optional[str]): recorded in ``adapter_config.json``. Default is None.
        dtype (Optional[torch.dtype]): dtype of the saved adapters; None keeps the model's. Default is None.

    Returns:
        Optional[Path]: ``directory`` on rank 0, None on the other ranks.
    """
    rank_zero = not dist.is_initialized() or dist.get_rank() == 0
    names = lora_modules(module)
    rank, alpha, dropout = lora_hyperparameters(module)
    keys = [n + s for n in names for s in (_A, _B)]
    tensors = {}
    for key, value in _full_tensors(module, keys):
        if rank_zero:
            tensors[peft_key(key)] = value.to(dtype or value.dtype).contiguous()
    if not rank_zero:
        return None
    directory = Path(directory)
    config = adapter_config(
        list(names), rank=rank, alpha=alpha, dropout=dropout, base_model_name_or_path=base_model_name_or_path
    )
    _write_atomically(
        directory,
        {
            ADAPTER_WEIGHTS: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
            ADAPTER_CONFIG: lambda p: p.write_text(json.dumps(config, indent=2) + "\n"),
        },
    )
    return directory


def merged_state_dict(module: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """The model's full state dict with every adapter merged into its base weight; call on every rank.

    FP8 base weights are dequantised with their ``weight_scale_inv``; ``W + (alpha / rank) B A`` is formed in
    fp32 and returned in fp32 (the writer rounds once to its save dtype).

    Args:
        module (nn.Module): the LoRA model (whole).

    Returns:
        Optional[Dict[str, torch.Tensor]]: plugin keys -> full tensors on rank 0 (adapter and scale keys
        removed), None on the other ranks.
    """
    rank_zero = not dist.is_initialized() or dist.get_rank() == 0
    adapted = lora_modules(module)
    state: Dict[str, torch.Tensor] = {}
    for key, value in _full_tensors(module):
        if rank_zero:
            state[key] = value
    if not rank_zero:
        return None
    for name in adapted:
        base = state[name + ".weight"]
        if base.dtype == _fp8.FP8_DTYPE:
            base = _fp8.dequantize(base, state.pop(name + ".weight" + _fp8.SCALE_SUFFIX), torch.float32)
        a, b = state.pop(name + _A).float(), state.pop(name + _B).float()
        m = adapted[name]
        state[name + ".weight"] = base.float() + (m.alpha / m.rank) * (b @ a)
    for key in [k for k in state if k.endswith(_fp8.SCALE_SUFFIX)]:
        weight = key[: -len(_fp8.SCALE_SUFFIX)]
        state[weight] = _fp8.dequantize(state[weight], state.pop(key), torch.float32)
    return state


def save_merged_checkpoint(
    module: nn.Module,
    directory: Union[str, Path],
    *,
    config: dict,
    source_dir: Optional[Union[str, Path]] = None,
    dtype: Optional[torch.dtype] = torch.bfloat16,
) -> Optional[Path]:
    """Write the merged model as an HF checkpoint that transformers loads; call on every rank.

    Rank 0 holds the whole merged model in CPU memory (fp32) while writing: meant for the small siblings
    and the demo; for Mistral Medium 3.5 save the adapter and merge offline.

    Args:
        module (nn.Module): the LoRA model (whole).
        directory (Union[str, Path]): the checkpoint directory (replaced if it exists).
        config (dict): the base checkpoint's ``config.json`` (its ``quantization_config`` is dropped).
        source_dir (Optional[Union[str, Path]]): where to copy tokenizer/processor files from. Default is None.
        dtype (Optional[torch.dtype]): dtype of the saved tensors. Default is bf16.

    Returns:
        Optional[Path]: ``directory`` on rank 0, None elsewhere.
    """
    state = merged_state_dict(module)
    if state is None:
        return None
    return write_hf_checkpoint(state, directory, config=config, source_dir=source_dir, dtype=dtype)


class LoRAAdapterSaver:
    """Wraps a :class:`Mistral3HFCheckpointer` so that a recipe's ``save_distributed`` writes a LoRA run's outputs.

    ``<output_dir>/epoch_<N>/adapter/`` gets the PEFT adapter; with ``save_merged_model`` the merged model is
    written as an HF checkpoint in ``<output_dir>/epoch_<N>/`` itself (written first, since it replaces the
    directory). Everything else (``reader``, attributes) is the wrapped checkpointer's.

    Args:
        checkpointer (Mistral3HFCheckpointer): the recipe's checkpointer.
        save_merged_model (bool): also write the merged model. Default is False.
    """

    def __init__(self, checkpointer, save_merged_model: bool = False) -> None:
        self._checkpointer = checkpointer
        self._save_merged_model = save_merged_model

    def __getattr__(self, name: str):
        return getattr(self._checkpointer, name)

    def save_distributed(self, module: nn.Module, epoch: int, *, mesh=None, pp_dim: str = "pp") -> Path:
        """Save the adapter (and the merged model) of ``module``; call on every rank.

        Args:
            module (nn.Module): the whole LoRA model (FSDP-sharded or not).
            epoch (int): names the directory.
            mesh (Optional[DeviceMesh]): unused (the model is gathered over its own meshes). Default is None.
            pp_dim (str): unused. Default is "pp".

        Returns:
            Path: ``<output_dir>/epoch_<epoch>``.
        """
        ckpt = self._checkpointer
        out = Path(ckpt._output_dir) / f"epoch_{epoch}"
        if self._save_merged_model:
            save_merged_checkpoint(
                module, out, config=ckpt._source.config, source_dir=ckpt._checkpoint_dir, dtype=ckpt._save_dtype
            )
        save_peft_adapter(module, out / "adapter", base_model_name_or_path=str(ckpt._checkpoint_dir))
        if dist.is_initialized():
            dist.barrier()
        return out
