"""Stored weights the model does not read, and the tied head against a real lm_head, against transformers."""

import json

import pytest
import torch
from _tiny_checkpoints import LAYERS, tiny_hf_model, write_checkpoint
from test_round_trip import _batch, _plugin_model
from torchtune import training
from torchtune_mistral3.checkpointing import HFCheckpointReader, Mistral3HFCheckpointer, mistral3_from_hf_config


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model()


def _edit_config(path, **top_level):
    config = json.loads((path / "config.json").read_text())
    for key, value in top_level.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    return config


def _meta_model(path, **kwargs):
    with torch.device("meta"):
        return mistral3_from_hf_config(str(path), **kwargs)


def test_config_with_fewer_layers_than_the_weights_is_refused(hf_model, tmp_path):
    src = write_checkpoint(hf_model, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = LAYERS - 1
    (src / "config.json").write_text(json.dumps(config))
    model = _meta_model(src)
    last = LAYERS - 1
    ckpt = Mistral3HFCheckpointer(str(src), output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="no parameter of the model reads") as e:
        ckpt.check_model_keys(model)
    message = str(e.value)
    assert f"checkpoint '{src}' holds 9 weights" in message
    assert f"model.language_model.layers.{last}.self_attn.q_proj.weight" in message
    assert "checkpointer.ignore_unexpected_keys" in message

    # Dropping the layer on purpose: its weights, FP8 scales and activation scales are all left out.
    pattern = rf"model\.language_model\.layers\.{last}\."
    ckpt = Mistral3HFCheckpointer(str(src), output_dir=str(tmp_path / "out"), ignore_unexpected_keys=[pattern])
    ckpt.check_model_keys(model)
    stored = [k for k in hf_model.state_dict() if k.startswith(f"model.language_model.layers.{last}.")]
    assert len(stored) == 9 and set(stored) <= set(ckpt.reader.ignored_keys)
    assert len(ckpt.reader.ignored_keys) == 9 + 2 * 7  # 7 FP8 linears: weight_scale_inv + activation_scale


def test_fewer_layers_is_checked_on_the_whole_model_not_a_pipeline_stage(hf_model, tmp_path):
    from torchtune_mistral3.training import cut_pipeline_stage

    src = write_checkpoint(hf_model, tmp_path / "src")
    model = _meta_model(src)
    ckpt = Mistral3HFCheckpointer(str(src), output_dir=str(tmp_path / "out"))
    ckpt.check_model_keys(model)  # every stored weight is read by some stage
    stage = cut_pipeline_stage(model, 0, [1, 1])
    with pytest.raises(ValueError, match="no parameter of the model reads"):
        ckpt.check_model_keys(stage)  # one stage alone reads only its own layers


def _logits(model, hf):
    tokens, encoder_input = _batch()
    image = encoder_input["image"]
    with torch.no_grad():
        expected = hf(input_ids=tokens, pixel_values=image["pixel_values"], image_sizes=image["image_sizes"]).logits
        actual = model(tokens, encoder_input=encoder_input)
    return actual, expected


@pytest.mark.parametrize("flag", [True, None], ids=["tie_true", "tie_absent"])
@pytest.mark.parametrize("head", ["real", "copy_of_embedding"])
def test_tied_flag_with_stored_head_follows_transformers(hf_model, tmp_path, flag, head):
    from transformers import Mistral3ForConditionalGeneration

    if head == "copy_of_embedding":
        hf_model = tiny_hf_model()
        with torch.no_grad():
            hf_model.lm_head.weight.copy_(hf_model.model.language_model.embed_tokens.weight)
    src = write_checkpoint(hf_model, tmp_path / "src", fp8=False)
    _edit_config(src, tie_word_embeddings=flag)
    hf = Mistral3ForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    hf_tied = hf.lm_head.weight is hf.model.language_model.embed_tokens.weight
    assert hf_tied == (head == "copy_of_embedding")

    Mistral3HFCheckpointer(str(src), output_dir=str(tmp_path / "out")).check_model_keys(_meta_model(src))
    model = _plugin_model(src, torch.float32)
    assert ("decoder.output.weight" not in model.state_dict()) == hf_tied
    actual, expected = _logits(model, hf)
    rel = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert rel < 1e-5, rel

    # The save says what it holds: a real head is saved with tie_word_embeddings false, a tied one without it.
    ckpt = Mistral3HFCheckpointer(str(src), output_dir=str(tmp_path / "out"), save_dtype=None)
    ckpt.save_checkpoint({training.MODEL_KEY: model.state_dict()}, epoch=0)
    saved = json.loads((tmp_path / "out" / "epoch_0" / "config.json").read_text())
    assert saved.get("tie_word_embeddings", True) == hf_tied


def test_model_that_ties_a_real_head_away_is_refused(hf_model, tmp_path):
    src = write_checkpoint(hf_model, tmp_path / "src", fp8=False)
    _edit_config(src, tie_word_embeddings=None)
    model = _meta_model(src, tie_word_embeddings=True)  # e.g. a named size built for a tied checkpoint
    ckpt = Mistral3HFCheckpointer(str(src), output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="'lm_head.weight' differs from the embedding but the model ties"):
        ckpt.check_model_keys(model)


def test_reader_ignore_pattern_matches_from_the_start(hf_model, tmp_path):
    src = write_checkpoint(hf_model, tmp_path / "src", fp8=False)
    reader = HFCheckpointReader(src, ignore_unexpected_keys=[r"lm_head\."])
    assert reader.ignored_keys == ["lm_head.weight"] and "decoder.output.weight" not in reader
    assert HFCheckpointReader(src, ignore_unexpected_keys=[r"head\."]).ignored_keys == []
