"""Tiny Mistral3 checkpoints in the on-disk formats Mistral ships, written independently of the plugin's code.

The FP8 quantiser and the legacy-layout renames here are written from the format description
(``shared/reference/mistral-medium-3.5-model.md`` sections 1.6 and 3), not imported from the plugin, so the
tests compare the plugin against an independent producer and against transformers.
"""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

VOCAB, DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 256, 64, 96, 2, 4, 2, 16

QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "activation_scheme": "static",
    "weight_block_size": None,
    "dequantize": False,
    "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
}

TEXT_LINEAR = re.compile(r"^model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
ASSET_FILES = {"tekken.json": '{"vocab": []}', "tokenizer_config.json": "{}", "chat_template.jinja": "{{ x }}"}


def tiny_hf_model(seed: int = 0):
    """A random fp32 ``Mistral3ForConditionalGeneration`` with YaRN + Llama-4 scaling, untied, every weight random."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig
    from transformers.models.ministral3 import Ministral3Config

    text = Ministral3Config(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=1024,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=1e6,
            factor=64.0,
            original_max_position_embeddings=16,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=0.0,
            llama_4_scaling_beta=0.1,
        ),
        tie_word_embeddings=False,
    )
    vision = PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=14,
        image_size=112,
        hidden_act="silu",
    )
    config = Mistral3Config(
        text_config=text, vision_config=vision, tie_word_embeddings=False, spatial_merge_size=2, image_token_index=10
    )
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def to_legacy(key: str) -> str:
    """Runtime-layout key -> the legacy "llava" layout (what transformers 5.x save_pretrained writes)."""
    for new, old in (
        ("lm_head.", "language_model.lm_head."),
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def quantize(w: torch.Tensor, scale_dtype=torch.bfloat16):
    """Per-tensor E4M3 as Mistral ships it: scale = amax / 448 (stored rounded), q = w / scale."""
    scale = (w.float().abs().max() / 448.0).to(scale_dtype)
    return (w.float() / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def quantize_blocks(w: torch.Tensor, block):
    """Block-scaled E4M3 (DeepSeek style): one fp32 scale per block x block tile, ceil-divided."""
    bm, bn = block
    rows, cols = w.shape
    grid = torch.zeros(-(-rows // bm), -(-cols // bn))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            grid[i, j] = w[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn].float().abs().max() / 448.0
    full = grid.repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]
    return (w.float() / full).clamp(-448, 448).to(torch.float8_e4m3fn), grid


def hf_tensors(model, *, fp8=True, scale_dtype=torch.bfloat16, scale_shape=(), block=None, layout="runtime"):
    """The checkpoint's tensors: bf16 everywhere, text linears FP8 (+ weight_scale_inv, activation_scale)."""
    out = {}
    gen = torch.Generator().manual_seed(1)
    for key, value in model.state_dict().items():
        value = value.detach().to(torch.bfloat16)
        if fp8 and TEXT_LINEAR.match(key):
            if block is None:
                q, scale = quantize(value, scale_dtype)
                scale = scale.reshape(scale_shape)
            else:
                q, scale = quantize_blocks(value, block)
            out[key] = q
            out[key + "_scale_inv"] = scale
            out[key[: -len("weight")] + "activation_scale"] = (torch.rand((), generator=gen) + 0.1).to(torch.bfloat16)
        else:
            out[key] = value
    if layout == "legacy":
        out = {to_legacy(k): v for k, v in out.items()}
    return out


def write_checkpoint(model, path, *, shards=1, fp8=True, assets=True, **kwargs) -> Path:
    """Write ``model`` as an HF checkpoint directory (config.json, safetensors or a sharded index, assets)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(model, fp8=fp8, **kwargs)
    config = model.config.to_dict()
    config["dtype"] = "bfloat16"
    if fp8:
        config["quantization_config"] = dict(QUANTIZATION_CONFIG, weight_block_size=kwargs.get("block"))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if shards == 1:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    else:
        # Round-robin over files, so a weight and its scale usually land in different shards.
        keys = list(tensors)
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in keys[i::shards]}
            save_file(part, path / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    if assets:
        for name, text in ASSET_FILES.items():
            (path / name).write_text(text)
    return path


def dequantized_reference(model, dtype, **kwargs):
    """HF runtime key -> the dequantised tensor by the published formula, computed here from the raw tensors."""
    tensors = hf_tensors(model, **kwargs)
    out = {}
    for key, value in tensors.items():
        if key.endswith(("_scale_inv", "activation_scale")):
            continue
        if value.dtype == torch.float8_e4m3fn:
            out[key] = (value.float() * tensors[key + "_scale_inv"].float()).to(dtype)
        else:
            out[key] = value.to(dtype)
    return out


class TinyTextModel(nn.Module):
    """The text half of the plugin's key layout (``decoder.*``), built from torchtune's llama3 blocks."""

    def __init__(self) -> None:
        super().__init__()
        from torchtune.models.llama3 import llama3

        self.decoder = llama3(
            vocab_size=VOCAB,
            num_layers=LAYERS,
            num_heads=HEADS,
            num_kv_heads=KV_HEADS,
            embed_dim=DIM,
            max_seq_len=64,
            intermediate_dim=HIDDEN,
        )

    def forward(self, tokens):
        return self.decoder(tokens)
