"""HF <-> plugin key conversion on both transformers layouts, exact both ways, against a real saved checkpoint."""

import torch
from _hf_reference import tiny_hf_config, tiny_hf_model
from safetensors.torch import load_file
from torchtune_mistral3.checkpointing import mistral3_from_hf_config
from torchtune_mistral3.models.mistral3 import mistral3_hf_to_tune, mistral3_tune_to_hf


def test_both_layouts_convert_exactly_both_ways(tmp_path):
    hf = tiny_hf_model(tiny_hf_config(projector_bias=True))
    runtime = hf.state_dict()  # model.language_model.*, lm_head.weight
    hf.save_pretrained(tmp_path)
    legacy = load_file(tmp_path / "model.safetensors")  # what 5.x writes: language_model.model.*, ...
    assert any(k.startswith("language_model.model.") for k in legacy)
    assert any(k.startswith("model.language_model.") for k in runtime)

    model = mistral3_from_hf_config(str(tmp_path))
    expected_keys = set(model.state_dict())
    from_runtime, from_legacy = mistral3_hf_to_tune(runtime), mistral3_hf_to_tune(legacy)
    assert set(from_runtime) == set(from_legacy) == expected_keys
    for key, value in from_runtime.items():
        assert torch.equal(value, from_legacy[key]), key

    back = mistral3_tune_to_hf(from_legacy)
    assert set(back) == set(runtime)
    for key, value in back.items():
        assert torch.equal(value, runtime[key]), key

    model.load_state_dict(from_legacy, strict=True)
    assert set(mistral3_tune_to_hf(model.state_dict())) == set(runtime)


# The Pixtral tower and projector in transformers' module names -> the plugin's, written from the two models'
# module trees (transformers' PixtralTransformer / Mistral3MultiModalProjector, torchtune's layer names)
_VISION_NAMES = {
    "patch_conv.weight": "patch_conv.weight",
    "ln_pre.weight": "ln_pre.scale",
    "transformer.layers.{}.attention_norm.weight": "layers.{}.sa_norm.scale",
    "transformer.layers.{}.ffn_norm.weight": "layers.{}.mlp_norm.scale",
    "transformer.layers.{}.attention.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "transformer.layers.{}.attention.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "transformer.layers.{}.attention.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "transformer.layers.{}.attention.o_proj.weight": "layers.{}.attn.output_proj.weight",
    "transformer.layers.{}.feed_forward.gate_proj.weight": "layers.{}.mlp.w1.weight",
    "transformer.layers.{}.feed_forward.up_proj.weight": "layers.{}.mlp.w3.weight",
    "transformer.layers.{}.feed_forward.down_proj.weight": "layers.{}.mlp.w2.weight",
}
_PROJECTOR_NAMES = {
    "norm.weight": "norm.scale",
    "patch_merger.merging_layer.weight": "patch_merger.weight",
    "linear_1.weight": "linear_1.weight",
    "linear_1.bias": "linear_1.bias",
    "linear_2.weight": "linear_2.weight",
    "linear_2.bias": "linear_2.bias",
}


def _expected_tune_key(hf_key: str) -> str:
    """The plugin key of a transformers (runtime layout) key, from torchtune's own llama HF table for the text
    model and the tables above for the tower and projector (independent of the plugin's conversion code)."""
    from torchtune.models.convert_weights import _FROM_HF, get_mapped_key

    for prefix, table, target in (
        ("model.vision_tower.", _VISION_NAMES, "encoders.image.vision."),
        ("model.multi_modal_projector.", _PROJECTOR_NAMES, "encoders.image.projector."),
    ):
        if hf_key.startswith(prefix):
            return target + get_mapped_key(hf_key[len(prefix):], table)
    if hf_key == "lm_head.weight":
        return "decoder." + _FROM_HF[hf_key]
    assert hf_key.startswith("model.language_model."), hf_key
    return "decoder." + get_mapped_key("model." + hf_key[len("model.language_model."):], _FROM_HF)


def test_every_key_maps_to_the_module_transformers_names():
    # each tensor filled with its own value, so a swap of two same-shaped tensors (w1 <-> w3) shows
    hf = tiny_hf_model(tiny_hf_config(projector_bias=True))
    runtime = {k: torch.full_like(v, float(i)) for i, (k, v) in enumerate(hf.state_dict().items())}
    converted = mistral3_hf_to_tune(runtime)
    expected = {_expected_tune_key(k): v for k, v in runtime.items()}
    assert set(converted) == set(expected)
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key
    back = mistral3_tune_to_hf(expected)
    for key, value in runtime.items():
        assert torch.equal(back[key], value), key
