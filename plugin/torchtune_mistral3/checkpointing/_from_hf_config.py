"""The model an HF checkpoint directory describes: every dimension from its config.json, the head from its weights.

The model package translates the parsed config (``mistral3_arguments_from_hf_config``); reading files is here.
"""

import json
from pathlib import Path
from typing import Any, Dict, Tuple

from torchtune_mistral3.checkpointing._load import stores_real_lm_head
from torchtune_mistral3.checkpointing._reader import CONFIG_FNAME, HFCheckpointReader
from torchtune_mistral3.models.mistral3 import (
    Mistral3FusionModel,
    mistral3,
    mistral3_arguments_from_hf_config,
    mistral3_lora,
)

# Every stored key but the output head and the token embedding (both HF layouts), for a reader of just those.
_OTHER_KEYS = r"(?!(language_model\.)?lm_head\.|(model\.language_model|language_model\.model)\.embed_tokens\.)"


def _read_config(checkpoint_dir: str) -> Tuple[Dict[str, Any], Path]:
    """The checkpoint's parsed config.json and its path."""
    path = Path(checkpoint_dir) / CONFIG_FNAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: checkpoint_dir must be an HF checkpoint directory with config.json")
    with open(path) as f:
        return json.load(f), path


def _stores_real_lm_head(checkpoint_dir: str) -> bool:
    """Whether the checkpoint stores an ``lm_head.weight`` that is not a copy of ``embed_tokens.weight``."""
    directory = Path(checkpoint_dir)
    if not any(directory.glob("*.safetensors")):  # a config.json alone (no weights yet): nothing to keep
        return False
    return stores_real_lm_head(HFCheckpointReader(checkpoint_dir, ignore_unexpected_keys=[_OTHER_KEYS]))


def mistral3_from_hf_config(checkpoint_dir: str, **kwargs: Any) -> Mistral3FusionModel:
    """Build the model that matches the HF checkpoint in ``checkpoint_dir``, every dimension from its config.json.

    This is the builder for any checkpoint of the family (Mistral Medium 3.5, Ministral-3, tiny test
    checkpoints): ``model._component_: torchtune_mistral3.checkpointing.mistral3_from_hf_config`` with
    ``model.checkpoint_dir: ${checkpointer.checkpoint_dir}``.

    The output head is tied to the token embedding as ``Mistral3ForConditionalGeneration.from_pretrained``
    in transformers 5.x does it: when the top-level ``tie_word_embeddings`` is true or absent, unless the
    checkpoint stores an ``lm_head.weight`` that differs from ``embed_tokens.weight`` (then the real head is
    kept; transformers' own Ministral-3 converter writes that flag for untied models). ``text_config``'s flag
    is not read.

    Args:
        checkpoint_dir (str): directory holding ``config.json``.
        **kwargs (Any): overrides of :func:`~torchtune_mistral3.models.mistral3.mistral3` arguments, e.g.
            ``max_seq_len`` (smaller tables and a clear error for longer inputs) or the ``*_trainable`` flags.

    Returns:
        Mistral3FusionModel: the model, with random weights (the checkpointer loads them).

    Raises:
        FileNotFoundError: if ``checkpoint_dir`` has no config.json.

    Example:
        >>> model = mistral3_from_hf_config("/ckpt/Mistral-Medium-3.5-128B", max_seq_len=4096)
    """
    config, path = _read_config(checkpoint_dir)
    args = mistral3_arguments_from_hf_config(config, where=str(path))
    if args["tie_word_embeddings"] and "tie_word_embeddings" not in kwargs and _stores_real_lm_head(checkpoint_dir):
        args["tie_word_embeddings"] = False
    return mistral3(**{**args, **kwargs})


def mistral3_lora_from_hf_config(checkpoint_dir: str, **kwargs: Any) -> Mistral3FusionModel:
    """:func:`mistral3_from_hf_config` with LoRA (:func:`~torchtune_mistral3.models.mistral3.mistral3_lora`).

    ``model._component_: torchtune_mistral3.checkpointing.mistral3_lora_from_hf_config`` with
    ``model.checkpoint_dir: ${checkpointer.checkpoint_dir}`` and the LoRA arguments of ``mistral3_lora``.

    Args:
        checkpoint_dir (str): directory holding ``config.json``.
        **kwargs (Any): ``mistral3_lora`` arguments, and overrides of ``mistral3`` arguments.

    Returns:
        Mistral3FusionModel: the model, with random weights (the checkpointer loads them).

    Raises:
        FileNotFoundError: if ``checkpoint_dir`` has no config.json.
        ValueError: if ``fp8_base`` is requested for a checkpoint whose config.json declares no FP8
            ``quantization_config``.

    Example:
        >>> model = mistral3_lora_from_hf_config("/ckpt/Mistral-Medium-3.5-128B", lora_attn_modules=["q_proj"])
    """
    config, path = _read_config(checkpoint_dir)
    if kwargs.get("fp8_base") and (config.get("quantization_config") or {}).get("quant_method") != "fp8":
        raise ValueError(
            f"{path} declares no FP8 quantization_config (quant_method: fp8), so its weights are not stored in "
            "FP8: set model.fp8_base=False to train on a base in the compute dtype"
        )
    return mistral3_lora(**{**mistral3_arguments_from_hf_config(config, where=str(path)), **kwargs})
