"""A tiny Mistral 3 checkpoint in Mistral Medium 3.5's on-disk format, for the demo and for tests.

Same architecture and code paths as the 128B model (YaRN with the Llama-4 query scale active beyond 32
positions, Pixtral tower, projector, untied head, the real 131072-token tekken vocabulary), with small
widths so that it trains on a laptop CPU. The text linears are stored as per-tensor FP8 E4M3 with a bf16
``weight_scale_inv`` and an ``activation_scale``, exactly as Mistral ships the 128B model.
"""

import copy
import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from ._component_builders import mistral3
from ._model_builders import mistral3_arguments_from_hf_config

# The HF config.json of the demo model: the 128B model's layout and options at toy widths (the FP8 save adds
# Mistral's per-tensor ``quantization_config``).
DEMO_HF_CONFIG: Dict[str, Any] = {
    "architectures": ["Mistral3ForConditionalGeneration"],
    "model_type": "mistral3",
    "image_token_index": 10,
    "spatial_merge_size": 2,
    "projector_hidden_act": "gelu",
    "multimodal_projector_bias": False,
    "vision_feature_layer": -1,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "text_config": {
        "model_type": "ministral3",
        "vocab_size": 131072,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 24,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "pad_token_id": 11,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "rope_parameters": {
            "rope_type": "yarn",
            "type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 64.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 4.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 0.0,
            "llama_4_scaling_beta": 0.1,
        },
    },
    "vision_config": {
        "model_type": "pixtral",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_channels": 3,
        "image_size": 1540,
        "patch_size": 14,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    },
}


def _init_like_pretraining(model: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) weights, unit norms: a starting loss near ln(vocab), as a pretrained model's would be."""
    for name, p in model.named_parameters():
        if name.endswith("scale"):
            nn.init.ones_(p)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.normal_(p, std=std)


def write_demo_checkpoint(
    checkpoint_dir: str,
    seed: int = 0,
    hf_config: Optional[Dict[str, Any]] = None,
    tokenizer_file: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Write (once) a tiny FP8 Mistral 3 checkpoint with the real tekken tokenizer into ``checkpoint_dir``.

    The weights depend only on ``seed`` and ``hf_config``. A directory that already holds the same
    ``config.json`` is left as it is, so the demo config can call this on every run.

    Args:
        checkpoint_dir (str): directory to write (created atomically: written under a temporary name, renamed).
        seed (int): seed of the random weights. Default is 0.
        hf_config (Optional[Dict[str, Any]]): HF config of the model. Default is :data:`DEMO_HF_CONFIG`.
        tokenizer_file (Optional[str]): tekken.json to copy next to the weights. Default is the real tekken
            file that mistral-common ships (``tekken_240911.json``, the Pixtral vocabulary).
        overwrite (bool): rewrite even if the directory already holds this model. Default is False.

    Returns:
        Path: ``checkpoint_dir``.
    """
    from torchtune_mistral3.checkpointing import default_fp8_keys, write_hf_checkpoint

    config = copy.deepcopy(hf_config or DEMO_HF_CONFIG)
    target = Path(checkpoint_dir)
    existing = target / "config.json"
    marker = {"seed": seed, "config": config, "format": 3}
    if not overwrite and (target / "demo_checkpoint.json").is_file() and existing.is_file():
        if json.loads((target / "demo_checkpoint.json").read_text()) == marker:
            return target

    if tokenizer_file is None:
        import mistral_common

        tokenizer_file = str(Path(mistral_common.__file__).parent / "data" / "tekken_240911.json")

    staging = target.parent / f".{target.name}.source"
    staging.mkdir(parents=True, exist_ok=True)
    tekken = json.loads(Path(tokenizer_file).read_text())
    # The shipped file is Pixtral-12B's (16 px patches, no merge); declare this model's image geometry.
    tekken["image"] = {
        "image_patch_size": config["vision_config"]["patch_size"],
        "max_image_size": config["vision_config"]["image_size"],
        "spatial_merge_size": config["spatial_merge_size"],
    }
    (staging / "tekken.json").write_text(json.dumps(tekken, ensure_ascii=False))

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = mistral3(**mistral3_arguments_from_hf_config(config, where="DEMO_HF_CONFIG"))
        _init_like_pretraining(model)
    finally:
        torch.random.set_rng_state(generator_state)
    state_dict = model.state_dict()
    fp8_keys = default_fp8_keys(state_dict)
    # Mistral ships a static activation scale per FP8 linear; the value is unused in training.
    activation_scales = {k: torch.tensor(1.0 / 448, dtype=torch.bfloat16) for k in fp8_keys}
    write_hf_checkpoint(
        state_dict,
        target,
        config=config,
        source_dir=staging,
        dtype=torch.bfloat16,
        fp8_keys=fp8_keys,
        activation_scales=activation_scales,
    )
    (staging / "tekken.json").unlink()
    staging.rmdir()
    # Written last: a directory without it is rewritten on the next call.
    (target / "demo_checkpoint.json").write_text(json.dumps(marker, indent=2))
    return target

