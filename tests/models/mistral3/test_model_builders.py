"""Named sizes and the config.json builder against transformers models of the same configuration."""

import json

import pytest
import torch
from _hf_reference import tiny_hf_config
from torchtune.modules import TiedLinear
from torchtune_mistral3.checkpointing import mistral3_from_hf_config
from torchtune_mistral3.models.mistral3 import (
    ministral3_3b,
    ministral3_8b,
    ministral3_14b,
    mistral3_arguments_from_hf_config,
    mistral3p5_128b,
    tune_key_to_hf,
)
from transformers import Mistral3Config, Mistral3ForConditionalGeneration

# Dimensions from the reference notes (§0, §2), written as HF configs: (builder, text, vision, tied, total B).
_MINISTRAL_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
NAMED_SIZES = {
    "mistral3p5_128b": (
        mistral3p5_128b,
        dict(num_hidden_layers=88, hidden_size=12288, num_attention_heads=96, intermediate_size=28672),
        dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16),
        False,
        127.70,
    ),
    "ministral3_3b": (
        ministral3_3b,
        dict(num_hidden_layers=26, hidden_size=3072, num_attention_heads=32, intermediate_size=9216),
        _MINISTRAL_VISION,
        True,
        None,
    ),
    "ministral3_8b": (
        ministral3_8b,
        dict(num_hidden_layers=34, hidden_size=4096, num_attention_heads=32, intermediate_size=14336),
        _MINISTRAL_VISION,
        False,
        None,
    ),
    "ministral3_14b": (
        ministral3_14b,
        dict(num_hidden_layers=40, hidden_size=5120, num_attention_heads=32, intermediate_size=16384),
        _MINISTRAL_VISION,
        False,
        None,
    ),
}


def _meta_hf_model(text, vision, tied):
    config = Mistral3Config(
        text_config=dict(model_type="ministral3", vocab_size=131072, num_key_value_heads=8, head_dim=128, **text),
        vision_config=dict(model_type="pixtral", patch_size=14, image_size=1540, hidden_act="silu", **vision),
        tie_word_embeddings=tied,
    )
    with torch.device("meta"):
        return Mistral3ForConditionalGeneration(config)


def _num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(NAMED_SIZES))
def test_named_size_matches_transformers(name):
    builder, text, vision, tied, total_b = NAMED_SIZES[name]
    hf = _meta_hf_model(text, vision, tied)
    with torch.device("meta"):
        model = builder()
    assert _num_params(model) == _num_params(hf)
    if total_b is not None:
        assert round(_num_params(model) / 1e9, 2) == total_b
    ours = {tune_key_to_hf(k): v.shape for k, v in model.state_dict().items()}
    theirs = {k: v.shape for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert ours == theirs
    assert isinstance(model.decoder.output, TiedLinear) == tied


def test_named_size_accepts_overrides():
    with torch.device("meta"):
        model = ministral3_8b(max_seq_len=4096, vision_trainable=True)
    assert model.decoder.max_seq_len == 4096
    assert model.decoder.layers[0].attn.pos_embeddings.cos.shape[0] == 4096
    assert all(p.requires_grad for p in model.encoders["image"].vision.parameters())


def test_tied_head_and_embeddings_must_train_together():
    with pytest.raises(ValueError, match="tied"), torch.device("meta"):
        ministral3_3b(output_trainable=False)


@pytest.mark.parametrize(
    "config_kwargs",
    [dict(), dict(head_dim=16, mscale_all_dim=1.0, projector_bias=True, tie_word_embeddings=True)],
)
def test_from_hf_config_reproduces_the_config(tmp_path, config_kwargs):
    config = tiny_hf_config(**config_kwargs)
    config.save_pretrained(tmp_path)
    model = mistral3_from_hf_config(str(tmp_path))
    with torch.device("meta"):
        hf = Mistral3ForConditionalGeneration(config)

    tied = config.tie_word_embeddings
    ours = {tune_key_to_hf(k): v.shape for k, v in model.state_dict().items()}
    assert ours == {k: v.shape for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}

    text, vision = config.text_config, config.vision_config
    rope = text.rope_parameters
    attn = model.decoder.layers[0].attn
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (
        text.num_attention_heads,
        text.num_key_value_heads,
        text.head_dim,
    )
    assert model.decoder.max_seq_len == text.max_position_embeddings
    assert model.decoder.norm.eps == model.decoder.layers[0].sa_norm.eps == text.rms_norm_eps
    assert attn.query_scale.beta == rope["llama_4_scaling_beta"]
    assert attn.query_scale.original_max_seq_len == rope["original_max_position_embeddings"]
    assert attn.pos_embeddings.scaling_factor == rope["factor"]
    assert model.tok_embeddings.padding_idx == text.pad_token_id
    assert model.encoder_tokens["image"] == config.image_token_index
    encoder = model.encoders["image"]
    assert encoder.vision.patch_size == vision.patch_size
    assert encoder.vision.max_patches_per_side == vision.image_size // vision.patch_size
    assert encoder.vision.layers[0].attn.head_dim == vision.hidden_size // vision.num_attention_heads
    assert encoder.projector.norm.eps == text.rms_norm_eps
    assert encoder.projector.spatial_merge_size == config.spatial_merge_size
    assert isinstance(model.decoder.output, TiedLinear) == tied


def test_from_hf_config_overrides(tmp_path):
    tiny_hf_config().save_pretrained(tmp_path)
    model = mistral3_from_hf_config(str(tmp_path), max_seq_len=48, vision_trainable=True, decoder_trainable=False)
    assert model.decoder.max_seq_len == 48
    assert all(p.requires_grad for p in model.encoders["image"].vision.parameters())
    assert not any(p.requires_grad for p in model.decoder.layers.parameters())


def test_top_level_tie_flag_decides(tmp_path):
    # transformers 5.x ties by the top-level flag (default True) even when text_config says false.
    config = json.loads(tiny_hf_config().to_json_string())
    del config["tie_word_embeddings"]
    assert config["text_config"]["tie_word_embeddings"] is False
    assert mistral3_arguments_from_hf_config(config)["tie_word_embeddings"] is True


def test_legacy_rope_scaling_fields_are_read():
    config = json.loads(tiny_hf_config().to_json_string())
    rope = config["text_config"].pop("rope_parameters")
    config["text_config"]["rope_theta"] = rope.pop("rope_theta")
    config["text_config"]["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
    args = mistral3_arguments_from_hf_config(config)
    assert args["rope_base"] == 1e6 and args["rope_scaling_factor"] == 64.0
    assert args["rope_mscale_all_dim"] == 0.0 and args["llama4_scaling_beta"] == 0.1


def test_from_hf_config_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        mistral3_from_hf_config(str(tmp_path))
    config = json.loads(tiny_hf_config().to_json_string())
    del config["text_config"]["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="text_config has no 'hidden_size'"):
        mistral3_from_hf_config(str(tmp_path))
    config = json.loads(tiny_hf_config().to_json_string())
    config["text_config"]["rope_parameters"]["rope_type"] = "longrope"
    with pytest.raises(ValueError, match="longrope"):
        mistral3_arguments_from_hf_config(config)
