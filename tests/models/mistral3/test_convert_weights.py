"""HF <-> plugin key conversion on both transformers layouts, exact both ways, against a real saved checkpoint."""

import torch
from _hf_reference import tiny_hf_config, tiny_hf_model
from safetensors.torch import load_file
from torchtune_mistral3.models.mistral3 import (
    mistral3_from_hf_config,
    mistral3_hf_to_tune,
    mistral3_tune_to_hf,
)


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
