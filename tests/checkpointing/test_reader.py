"""The reader against transformers' own FP8 dequantiser, for every on-disk variant Mistral checkpoints come in."""

import json
import struct

import pytest
import torch
from _tiny_checkpoints import dequantized_reference, tiny_hf_model, write_checkpoint
from safetensors.torch import save_file
from torchtune_mistral3.checkpointing import HFCheckpointReader
from torchtune_mistral3.models.mistral3 import hf_key_to_tune


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model()


def _transformers_dequantized(path, dtype):
    from transformers import FineGrainedFP8Config, Mistral3ForConditionalGeneration

    qcfg = FineGrainedFP8Config(dequantize=True, weight_block_size=None, activation_scheme="static")
    model = Mistral3ForConditionalGeneration.from_pretrained(path, quantization_config=qcfg, dtype=dtype)
    return model.state_dict()


VARIANTS = {
    "runtime": dict(layout="runtime"),
    "legacy": dict(layout="legacy"),
    "sharded_index": dict(layout="runtime", shards=3),
    "fp32_scale_shape_1": dict(scale_dtype=torch.float32, scale_shape=(1,)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_matches_transformers_dequantized(hf_model, tmp_path, variant, dtype):
    path = write_checkpoint(hf_model, tmp_path / variant, **VARIANTS[variant])
    expected = _transformers_dequantized(path, dtype)
    reader = HFCheckpointReader(path)
    assert len(reader) == len(expected)
    assert len(reader.fp8_keys()) == 14  # 2 layers x 7 text linears
    for hf_key, ref in expected.items():
        ours = reader.read(hf_key_to_tune(hf_key), dtype)
        assert ours.dtype == ref.dtype, hf_key
        assert torch.equal(ours, ref), hf_key


def test_fp8_matches_formula_and_lazy_mapping(hf_model, tmp_path):
    path = write_checkpoint(hf_model, tmp_path / "ckpt")
    reference = dequantized_reference(hf_model, torch.bfloat16)
    lazy = HFCheckpointReader(path).state_dict()
    assert sorted(lazy) == sorted(hf_key_to_tune(k) for k in reference)
    for hf_key, ref in reference.items():
        # Default dtype: FP8 products come back in fp32; one cast gives the bf16 bits of the formula.
        assert torch.equal(lazy[hf_key_to_tune(hf_key)].to(torch.bfloat16), ref), hf_key


def test_slices_equal_slices_of_the_whole(hf_model, tmp_path):
    reader = HFCheckpointReader(write_checkpoint(hf_model, tmp_path / "ckpt"))
    key = "decoder.layers.1.mlp.w2.weight"  # FP8, [64, 96]
    whole = reader.read(key)
    assert reader.info(key).is_fp8
    assert torch.equal(reader.read(key, offset=(16, 48), shape=(32, 24)), whole[16:48, 48:72])
    norm = reader.read("decoder.norm.scale", offset=(8,), shape=(4,))
    assert torch.equal(norm, reader.read("decoder.norm.scale")[8:12])


@pytest.mark.parametrize("block", [(16, 32), (32, 16)])
def test_block_scaled_matches_transformers(hf_model, tmp_path, block):
    path = write_checkpoint(hf_model, tmp_path / "block", block=list(block))
    from transformers import FineGrainedFP8Config, Mistral3ForConditionalGeneration

    qcfg = FineGrainedFP8Config(dequantize=True, weight_block_size=list(block), activation_scheme="static")
    expected = Mistral3ForConditionalGeneration.from_pretrained(path, quantization_config=qcfg, dtype=torch.float32)
    reader = HFCheckpointReader(path)
    for hf_key, ref in expected.state_dict().items():
        assert torch.equal(reader.read(hf_key_to_tune(hf_key), torch.float32), ref), hf_key
    # A slice that starts inside a block picks each element's own block scale.
    key = "decoder.layers.0.mlp.w1.weight"
    assert torch.equal(reader.read(key, offset=(5, 7), shape=(40, 50)), reader.read(key)[5:45, 7:57])


def test_block_scale_without_block_size_is_refused(hf_model, tmp_path):
    path = write_checkpoint(hf_model, tmp_path / "block", block=[16, 16])
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = None
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"weight_scale_inv' has shape \[\d+, \d+\], a block scale.*weight_block_size"):
        HFCheckpointReader(path)


def test_missing_file_named(hf_model, tmp_path):
    path = write_checkpoint(hf_model, tmp_path / "ckpt", shards=3)
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00003\.safetensors' is listed .* \(for key '"):
        HFCheckpointReader(path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFCheckpointReader(tmp_path)


def test_truncated_shard_named(hf_model, tmp_path):
    path = write_checkpoint(hf_model, tmp_path / "ckpt", shards=2)
    shard = path / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model-00001-of-00002\.safetensors' is truncated: tensor '.+' ends at byte"):
        HFCheckpointReader(path)
    # Cut inside the header.
    (n,) = struct.unpack("<Q", data[:8])
    shard.write_bytes(data[: 8 + n // 2])
    with pytest.raises(ValueError, match="is truncated: its header alone needs"):
        HFCheckpointReader(path)


def test_extra_key_named(hf_model, tmp_path):
    path = write_checkpoint(hf_model, tmp_path / "ckpt")
    save_file({"model.language_model.layers.0.mlp.extra.weight": torch.zeros(2)}, path / "zz-extra.safetensors")
    with pytest.raises(ValueError, match=r"zz-extra\.safetensors': unexpected key 'model\.language_model.*extra"):
        HFCheckpointReader(path)
    # Leaving the file out through checkpoint_files works.
    assert len(HFCheckpointReader(path, ["model.safetensors"])) > 0


def test_fp8_weight_without_scale_named(hf_model, tmp_path):
    path = write_checkpoint(hf_model, tmp_path / "ckpt", shards=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    dropped = "model.language_model.layers.0.self_attn.q_proj.weight_scale_inv"
    del index["weight_map"][dropped]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="FP8 weight 'model.language_model.layers.0.self_attn.q_proj.weight' has no"):
        HFCheckpointReader(path)


def test_index_pointing_to_wrong_file_named(hf_model, tmp_path):
    path = write_checkpoint(hf_model, tmp_path / "ckpt", shards=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    key = next(k for k, f in index["weight_map"].items() if f.startswith("model-00001"))
    index["weight_map"][key] = "model-00002-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"model-00002-of-00002.safetensors' does not contain key '{key}'"):
        HFCheckpointReader(path)
