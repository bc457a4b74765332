"""Key maps between Hugging Face ``Mistral3ForConditionalGeneration`` checkpoints and this plugin's modules.

The plugin applies RoPE in the same rotate-half layout as transformers, so conversion is a pure renaming:
no tensor is permuted, which keeps it exact in both directions and lets a loader fetch each key (or each
tensor-parallel slice of it) straight from safetensors.

transformers writes two layouts, and both are read:

- runtime layout (``model.language_model.*``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``,
  ``lm_head.weight``): what Mistral Medium 3.5 stores on disk;
- legacy "llava" layout (``language_model.model.*``, ``language_model.lm_head.weight``, ``vision_tower.*``,
  ``multi_modal_projector.*``): what Ministral-3 checkpoints and ``save_pretrained`` in transformers 5.x write.
"""

import re
from typing import Dict, Tuple

# HF runtime-layout key -> plugin key. ``{}`` stands for a layer index.
_FROM_HF = {
    "model.language_model.embed_tokens.weight": "decoder.tok_embeddings.weight",
    "model.language_model.norm.weight": "decoder.norm.scale",
    "lm_head.weight": "decoder.output.weight",
    "model.language_model.layers.{}.input_layernorm.weight": "decoder.layers.{}.sa_norm.scale",
    "model.language_model.layers.{}.post_attention_layernorm.weight": "decoder.layers.{}.mlp_norm.scale",
    "model.language_model.layers.{}.self_attn.q_proj.weight": "decoder.layers.{}.attn.q_proj.weight",
    "model.language_model.layers.{}.self_attn.k_proj.weight": "decoder.layers.{}.attn.k_proj.weight",
    "model.language_model.layers.{}.self_attn.v_proj.weight": "decoder.layers.{}.attn.v_proj.weight",
    "model.language_model.layers.{}.self_attn.o_proj.weight": "decoder.layers.{}.attn.output_proj.weight",
    "model.language_model.layers.{}.mlp.gate_proj.weight": "decoder.layers.{}.mlp.w1.weight",
    "model.language_model.layers.{}.mlp.down_proj.weight": "decoder.layers.{}.mlp.w2.weight",
    "model.language_model.layers.{}.mlp.up_proj.weight": "decoder.layers.{}.mlp.w3.weight",
    "model.vision_tower.patch_conv.weight": "encoders.image.vision.patch_conv.weight",
    "model.vision_tower.ln_pre.weight": "encoders.image.vision.ln_pre.scale",
    "model.vision_tower.transformer.layers.{}.attention_norm.weight": "encoders.image.vision.layers.{}.sa_norm.scale",
    "model.vision_tower.transformer.layers.{}.ffn_norm.weight": "encoders.image.vision.layers.{}.mlp_norm.scale",
    "model.vision_tower.transformer.layers.{}.attention.q_proj.weight": "encoders.image.vision.layers.{}.attn.q_proj.weight",
    "model.vision_tower.transformer.layers.{}.attention.k_proj.weight": "encoders.image.vision.layers.{}.attn.k_proj.weight",
    "model.vision_tower.transformer.layers.{}.attention.v_proj.weight": "encoders.image.vision.layers.{}.attn.v_proj.weight",
    "model.vision_tower.transformer.layers.{}.attention.o_proj.weight": "encoders.image.vision.layers.{}.attn.output_proj.weight",
    "model.vision_tower.transformer.layers.{}.feed_forward.gate_proj.weight": "encoders.image.vision.layers.{}.mlp.w1.weight",
    "model.vision_tower.transformer.layers.{}.feed_forward.down_proj.weight": "encoders.image.vision.layers.{}.mlp.w2.weight",
    "model.vision_tower.transformer.layers.{}.feed_forward.up_proj.weight": "encoders.image.vision.layers.{}.mlp.w3.weight",
    "model.multi_modal_projector.norm.weight": "encoders.image.projector.norm.scale",
    "model.multi_modal_projector.patch_merger.merging_layer.weight": "encoders.image.projector.patch_merger.weight",
    "model.multi_modal_projector.linear_1.weight": "encoders.image.projector.linear_1.weight",
    "model.multi_modal_projector.linear_1.bias": "encoders.image.projector.linear_1.bias",
    "model.multi_modal_projector.linear_2.weight": "encoders.image.projector.linear_2.weight",
    "model.multi_modal_projector.linear_2.bias": "encoders.image.projector.linear_2.bias",
}

# Legacy ("llava") prefixes, rewritten to the runtime layout before the table above is consulted.
# Order matters: the lm_head rule must win over the generic language_model rule.
_LEGACY_TO_RUNTIME = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)

_LAYER = re.compile(r"\.(\d+)\.")


_TO_HF = {v: k for k, v in _FROM_HF.items()}


def _split_layer(key: str) -> Tuple[str, str]:
    """Replace the first ``.N.`` in ``key`` by ``.{}.``; return the template and N ('' if none)."""
    m = _LAYER.search(key)
    if m is None:
        return key, ""
    return key[: m.start()] + ".{}." + key[m.end() :], m.group(1)


def to_runtime_layout(hf_key: str) -> str:
    """Return ``hf_key`` in transformers' runtime layout, whichever layout it was written in."""
    if hf_key.startswith("model.") or hf_key == "lm_head.weight":
        return hf_key
    for old, new in _LEGACY_TO_RUNTIME:
        if hf_key.startswith(old):
            return new + hf_key[len(old) :]
    return hf_key


def hf_key_to_tune(hf_key: str) -> str:
    """Map one HF key (runtime or legacy layout) to the plugin's key.

    Args:
        hf_key (str): a key of a transformers ``Mistral3ForConditionalGeneration`` state dict.

    Returns:
        str: the matching key of the plugin model's state dict.

    Raises:
        KeyError: if the key belongs to no known module (the message names the key).
    """
    template, layer = _split_layer(to_runtime_layout(hf_key))
    if template not in _FROM_HF:
        raise KeyError(f"'{hf_key}' is not a Mistral3ForConditionalGeneration weight this plugin knows")
    return _FROM_HF[template].format(layer)


def tune_key_to_hf(tune_key: str) -> str:
    """Map one plugin key to transformers' runtime layout (what Mistral Medium 3.5 stores on disk).

    Args:
        tune_key (str): a key of the plugin model's state dict.

    Returns:
        str: the matching key in transformers' runtime layout.

    Raises:
        KeyError: if the key belongs to no known module (the message names the key).
    """
    template, layer = _split_layer(tune_key)
    if template not in _TO_HF:
        raise KeyError(f"'{tune_key}' has no Hugging Face counterpart")
    return _TO_HF[template].format(layer)


def mistral3_hf_to_tune(state_dict: Dict) -> Dict:
    """Rename a HF state dict (either layout) to the plugin's keys; values are passed through untouched.

    Args:
        state_dict (Dict): HF keys to tensors.

    Returns:
        Dict: plugin keys to the same tensors.
    """
    return {hf_key_to_tune(k): v for k, v in state_dict.items()}


def mistral3_tune_to_hf(state_dict: Dict) -> Dict:
    """Rename the plugin's state dict to HF runtime-layout keys; values are passed through untouched.

    Args:
        state_dict (Dict): plugin keys to tensors.

    Returns:
        Dict: HF runtime-layout keys to the same tensors.
    """
    return {tune_key_to_hf(k): v for k, v in state_dict.items()}

