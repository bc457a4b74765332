"""A tiny Mistral 3 checkpoint in Mistral Medium 3.5's on-disk format, for the demo and for tests.

Same architecture and code paths as the 128B model (YaRN with the Llama-4 query scale active beyond 32
positions, Pixtral tower, projector, untied head, the real 131072-token tekken vocabulary), with small
widths so that it trains on a laptop CPU. The text linears are stored as per-tensor FP8 E4M3 with a bf16
``weight_scale_inv`` and an ``activation_scale``, exactly as Mistral ships the 128B model.
"""

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from torchtune_mistral3.checkpointing._writer import default_fp8_keys, write_hf_checkpoint
from torchtune_mistral3.models.mistral3 import mistral3, mistral3_arguments_from_hf_config

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


MARKER_FILE = "demo_checkpoint.json"


def write_demo_checkpoint(
    checkpoint_dir: str,
    seed: int = 0,
    hf_config: Optional[Dict[str, Any]] = None,
    tokenizer_file: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Write (once) a tiny FP8 Mistral 3 checkpoint with the real tekken tokenizer into ``checkpoint_dir``.

    The weights depend only on ``seed`` and ``hf_config``. A directory that already holds the same model (its
    ``demo_checkpoint.json`` marker says so) is left as it is, so the demo config can call this on every run.
    Nothing else is ever replaced: the writer creates ``checkpoint_dir`` when it does not exist (or is empty) and
    rewrites it only when it holds the writer's own earlier output and nothing else (the files its marker
    lists). Any other directory, e.g. a trained ``<output_dir>/epoch_<N>`` or a downloaded model, is refused.

    Args:
        checkpoint_dir (str): directory to write (written under a temporary name, then renamed into place).
        seed (int): seed of the random weights. Default is 0.
        hf_config (Optional[Dict[str, Any]]): HF config of the model. Default is :data:`DEMO_HF_CONFIG`.
        tokenizer_file (Optional[str]): tekken.json to copy next to the weights. Default is the real tekken
            file that mistral-common ships (``tekken_240911.json``, the Pixtral vocabulary).
        overwrite (bool): rewrite even if the directory already holds this model (still only the writer's own
            output). Default is False.

    Returns:
        Path: ``checkpoint_dir``.

    Raises:
        FileExistsError: if ``checkpoint_dir`` exists and is not this writer's own output (the message names it
            and what it holds).
    """
    config = copy.deepcopy(hf_config or DEMO_HF_CONFIG)
    target = Path(checkpoint_dir)
    marker = {"seed": seed, "config": config, "format": 3}
    if not overwrite and _read_marker(target) == marker and (target / "config.json").is_file():
        return target  # written before: nothing to do
    _check_own_output(target)

    written = target.parent / f".{target.name}.demo"
    _write(written, config, seed, tokenizer_file)
    # Written last, listing every file: a later call may replace exactly these and nothing else.
    files = sorted(p.name for p in written.iterdir()) + [MARKER_FILE]
    (written / MARKER_FILE).write_text(json.dumps({**marker, "files": files}, indent=2))
    _replace(target, written)
    return target


def _read_marker(target: Path) -> Optional[Dict[str, Any]]:
    """The marker in ``target`` without its file list, or None if there is none (or it cannot be read)."""
    try:
        saved = json.loads((target / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return {k: v for k, v in saved.items() if k != "files"} if isinstance(saved, dict) else None


def _check_own_output(target: Path) -> None:
    """Refuse ``target`` unless it is absent, empty, or holds the files its marker lists and nothing else.

    Raises:
        FileExistsError: if ``target`` is a file, or holds anything this writer did not write.
    """
    if not target.exists():
        return
    if not target.is_dir():
        _refuse(target, "is a file, not a directory")
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return
    try:
        own = set(json.loads((target / MARKER_FILE).read_text())["files"]) | {MARKER_FILE}
    except (OSError, ValueError, KeyError, TypeError):
        # no marker, an unreadable one, or one from before the marker listed its files
        _refuse(target, f"holds {_names(entries)} and no {MARKER_FILE} listing its files")
    foreign = [e for e in entries if e not in own]
    if foreign:
        _refuse(target, f"holds {_names(foreign)}, which the demo writer did not write")


def _names(entries: List[str]) -> str:
    return ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")


def _refuse(target: Path, why: str) -> None:
    raise FileExistsError(
        f"checkpoint_dir {target} {why}. The demo writes its random tiny model only into a new (or empty) directory "
        "or over its own earlier output, so it leaves this one untouched. To train from the checkpoint in it, set "
        f"prepare_checkpoint=null; for the demo model, point checkpoint_dir at a new directory (e.g. "
        f"checkpoint_dir={target.parent / (target.name + '_demo')}) or delete {target} yourself."
    )


def _replace(target: Path, written: Path) -> None:
    """Rename the finished ``written`` to ``target``, replacing the writer's own earlier output there."""
    if not target.exists():
        written.rename(target)
        return
    old = target.parent / f".{target.name}.demo-old"
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    written.rename(target)
    shutil.rmtree(old)


def write_tekken(path: Path, config: Dict[str, Any], tokenizer_file: Optional[str] = None) -> None:
    """Copy a tekken.json to ``path``, declaring the image geometry (patches, size, merge) of the HF ``config``.

    Args:
        path (Path): the file to write.
        config (Dict[str, Any]): the model's HF config.
        tokenizer_file (Optional[str]): tekken.json to copy. Default is the real tekken file that mistral-common
            ships (``tekken_240911.json``, the Pixtral vocabulary).
    """
    if tokenizer_file is None:
        import mistral_common

        tokenizer_file = str(Path(mistral_common.__file__).parent / "data" / "tekken_240911.json")
    tekken = json.loads(Path(tokenizer_file).read_text())
    # The shipped file is Pixtral-12B's (16 px patches, no merge); declare this model's image geometry.
    tekken["image"] = {
        "image_patch_size": config["vision_config"]["patch_size"],
        "max_image_size": config["vision_config"]["image_size"],
        "spatial_merge_size": config["spatial_merge_size"],
    }
    path.write_text(json.dumps(tekken, ensure_ascii=False))


def _write(directory: Path, config: Dict[str, Any], seed: int, tokenizer_file: Optional[str]) -> None:
    """Write the checkpoint of ``config`` with weights from ``seed`` into ``directory`` (replaced if it exists)."""
    staging = directory.parent / f"{directory.name}.source"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_tekken(staging / "tekken.json", config, tokenizer_file)

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
        directory,
        config=config,
        source_dir=staging,
        dtype=torch.bfloat16,
        fp8_keys=fp8_keys,
        activation_scales=activation_scales,
    )
    shutil.rmtree(staging)
