"""A Mistral Medium 3.5 checkpoint directory with real safetensors headers and no weight data, for rehearsals.

Every file carries the real header (MM3.5's HF key names, shapes and dtypes: FP8 E4M3 text linears with a
0-d bf16 ``weight_scale_inv`` and ``activation_scale``, bf16 tower, projector, norms, embedding and untied
``lm_head``) and is extended to its full length with ``truncate``, so the data region is a hole: a 128B
checkpoint takes a few MB of disk. :class:`~torchtune_mistral3.checkpointing.HFCheckpointReader` accepts it
(every byte the header declares is "there"); reading a value would give zeros, which a rehearsal never does.
"""

import copy
import json
import math
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

from torchtune_mistral3.checkpointing._demo_checkpoint import DEMO_HF_CONFIG, write_tekken

_ST_NAMES = {torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16", torch.float32: "F32"}

# transformers' Mistral3Config of MM3.5 as far as docs/reference confirm it (text 88 x 12288, 96/8 heads, vocab
# 131072, YaRN factor 64 over 4096; Pixtral 48 x 1664; untied head; per-tensor static FP8); the RoPE values
# not confirmed for MM3.5 follow Devstral-2-123B, as ``mistral3p5_128b`` does. Shapes are what matters here.
_MM35_OVER_DEMO: Dict[str, Any] = {
    "text_config": {
        "hidden_size": 12288, "intermediate_size": 28672, "num_hidden_layers": 88, "num_attention_heads": 96,
        "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 262144,
        "rope_parameters": {"original_max_position_embeddings": 4096, "llama_4_scaling_beta": 0.0},
    },
    "vision_config": {
        "hidden_size": 1664, "intermediate_size": 8192, "num_hidden_layers": 48, "num_attention_heads": 16,
        "head_dim": 104,
    },
    "quantization_config": {
        "quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None, "dequantize": False,
        "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
    },
}
# the demo model's config.json (the same architecture and options) at MM3.5's widths, with its FP8 quantization
MM35_HF_CONFIG: Dict[str, Any] = OmegaConf.to_container(OmegaConf.merge(DEMO_HF_CONFIG, _MM35_OVER_DEMO))

_SHARD_BYTES = 5 * 1024**3


def mm35_tensor_specs(hf_config: Optional[Dict[str, Any]] = None) -> List[Tuple[str, Tuple[int, ...], torch.dtype]]:
    """Every tensor of the MM3.5 HF checkpoint: ``(hf_key, shape, dtype)`` in the order a shard writer meets them.

    Keys and shapes come from the plugin's own model (built on the meta device from ``hf_config``) through its
    key map, so they are the keys the loader asks for; FP8 layout per docs/reference: the text linears in
    E4M3 with 0-d bf16 ``weight_scale_inv`` and ``activation_scale``, everything else bf16.

    Args:
        hf_config (Optional[Dict[str, Any]]): the HF config. Default is :data:`MM35_HF_CONFIG`.

    Returns:
        List[Tuple[str, Tuple[int, ...], torch.dtype]]: the tensors.
    """
    from torchtune_mistral3.checkpointing import default_fp8_keys
    from torchtune_mistral3.models.mistral3 import mistral3, mistral3_arguments_from_hf_config, tune_key_to_hf

    config = hf_config or MM35_HF_CONFIG
    with torch.device("meta"):
        model = mistral3(**mistral3_arguments_from_hf_config(config, where="MM35_HF_CONFIG"))
    state = model.state_dict()
    fp8 = set(default_fp8_keys(state)) if config.get("quantization_config") else set()
    specs = []
    for key, t in state.items():
        hf = tune_key_to_hf(key)
        if key in fp8:
            specs.append((hf, tuple(t.shape), torch.float8_e4m3fn))
            stem = hf[: -len("weight")]
            specs.append((stem + "weight_scale_inv", (), torch.bfloat16))
            specs.append((stem + "activation_scale", (), torch.bfloat16))
        else:
            specs.append((hf, tuple(t.shape), torch.bfloat16))
    return specs


def _write_header_only(path: Path, tensors: List[Tuple[str, Tuple[int, ...], torch.dtype]]) -> int:
    """Write a safetensors file whose data region is a hole; return its data bytes."""
    header: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape, dtype in tensors:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)  # sparse: the data bytes are never written
    return offset


def write_header_only_checkpoint(
    checkpoint_dir: str,
    hf_config: Optional[Dict[str, Any]] = None,
    tokenizer_file: Optional[str] = None,
    drop_keys: Tuple[str, ...] = (),
    shard_bytes: int = _SHARD_BYTES,
) -> Path:
    """Write an MM3.5-layout checkpoint (config.json, tekken.json, index, shards) whose files hold no weight data.

    Args:
        checkpoint_dir (str): directory to write (created).
        hf_config (Optional[Dict[str, Any]]): the HF config. Default is :data:`MM35_HF_CONFIG`.
        tokenizer_file (Optional[str]): tekken.json to copy. Default is the 131072-token tekken file that
            mistral-common ships, with this model's image geometry declared (as the demo checkpoint does).
        drop_keys (Tuple[str, ...]): HF keys to leave out (tests of the pre-flight check). Default is none.
        shard_bytes (int): data bytes per shard at most. Default is 5 GiB.

    Returns:
        Path: ``checkpoint_dir``.
    """
    config = copy.deepcopy(hf_config or MM35_HF_CONFIG)
    target = Path(checkpoint_dir)
    target.mkdir(parents=True, exist_ok=True)
    specs = [s for s in mm35_tensor_specs(config) if s[0] not in drop_keys]
    shards: List[List[Tuple[str, Tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for spec in specs:
        n = math.prod(spec[1]) * torch.empty((), dtype=spec[2]).element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += _write_header_only(target / name, shard)
        weight_map.update({key: name for key, _, _ in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tekken(target / "tekken.json", config, tokenizer_file)
    return target
