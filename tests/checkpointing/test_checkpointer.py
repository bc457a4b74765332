"""The recipe-facing checkpointer: load lazily, save what transformers loads, atomically."""

import json

import pytest
import torch
from _tiny_checkpoints import (
    ASSET_FILES,
    TinyTextModel,
    dequantized_reference,
    tiny_hf_model,
    write_checkpoint,
)
from safetensors import safe_open
from torchtune import training
from torchtune_mistral3.checkpointing import HFCheckpointReader, Mistral3HFCheckpointer, load_into_module
from torchtune_mistral3.checkpointing import _writer as writer_module
from torchtune_mistral3.models.mistral3 import hf_key_to_tune, tune_key_to_hf


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model()


@pytest.fixture
def fp8_dir(hf_model, tmp_path):
    return write_checkpoint(hf_model, tmp_path / "src", shards=2)


def _checkpointer(src, out, **kwargs):
    return Mistral3HFCheckpointer(checkpoint_dir=str(src), output_dir=str(out), **kwargs)


def _materialise(lazy):
    return {k: v.clone() for k, v in lazy.items()}


def test_load_returns_lazy_plugin_state_dict(fp8_dir, hf_model, tmp_path):
    state = _checkpointer(fp8_dir, tmp_path / "out").load_checkpoint()
    model_sd = state[training.MODEL_KEY]
    assert not isinstance(model_sd, dict)  # a Mapping that reads on lookup
    reference = dequantized_reference(hf_model, torch.bfloat16)
    assert sorted(model_sd) == sorted(hf_key_to_tune(k) for k in reference)
    for hf_key, ref in reference.items():
        assert torch.equal(model_sd[hf_key_to_tune(hf_key)].to(torch.bfloat16), ref)


def test_torchtune_loader_accepts_the_lazy_mapping(fp8_dir, hf_model, tmp_path):
    """The stock recipe's loader (``load_from_full_model_state_dict``) places each lazily read tensor."""
    with torch.device("meta"):
        model = TinyTextModel()
    lazy = _checkpointer(fp8_dir, tmp_path / "out").load_checkpoint()[training.MODEL_KEY]
    text_only = {k: lazy[k] for k in model.state_dict()}
    training.load_from_full_model_state_dict(model, text_only, torch.device("cpu"), strict=True)
    reference = dequantized_reference(hf_model, torch.float32)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[tune_key_to_hf(key)]), key


@pytest.mark.parametrize("meta", [True, False])
def test_load_into_module_matches_formula(fp8_dir, hf_model, meta):
    with torch.device("meta" if meta else "cpu"):
        model = TinyTextModel().to(torch.bfloat16)
    params_before = {n: p for n, p in model.named_parameters()}
    load_into_module(model, HFCheckpointReader(fp8_dir))
    reference = dequantized_reference(hf_model, torch.bfloat16)
    for key, value in model.state_dict().items():
        assert value.device.type == "cpu" and value.dtype == torch.bfloat16
        assert torch.equal(value, reference[tune_key_to_hf(key)]), key
    if not meta:  # filled in place: the optimizer's references stay valid
        assert all(p is params_before[n] for n, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_load_into_module_shape_mismatch_and_missing_key(fp8_dir):
    model = TinyTextModel()
    model.decoder.layers[1].mlp.w2 = torch.nn.Linear(10, 64, bias=False)
    with pytest.raises(
        ValueError, match=r"model-0000\d-of-00002\.safetensors': 'model\.language_model\.layers\.1\.mlp\.down_proj"
    ):
        load_into_module(model, HFCheckpointReader(fp8_dir))
    model = TinyTextModel()
    model.decoder.layers[0].mlp.register_buffer("extra", torch.zeros(2))
    with pytest.raises(KeyError, match=r"lacks 1 weights of the model: \['decoder\.layers\.0\.mlp\.extra'\]"):
        load_into_module(model, HFCheckpointReader(fp8_dir))
    assert load_into_module(model, HFCheckpointReader(fp8_dir), strict=False) == ["decoder.layers.0.mlp.extra"]


def test_save_bf16_round_trip_with_transformers(fp8_dir, hf_model, tmp_path):
    from transformers import Mistral3ForConditionalGeneration

    ckpt = _checkpointer(fp8_dir, tmp_path / "out", max_shard_size_gb=40e3 / 1024**3)  # several small files
    loaded = _materialise(ckpt.load_checkpoint()[training.MODEL_KEY])
    ckpt.save_checkpoint({training.MODEL_KEY: loaded}, epoch=0)
    out = tmp_path / "out" / "epoch_0"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    for name, text in ASSET_FILES.items():
        assert (out / name).read_text() == text
    assert not list(out.glob("*.partial")) and not list((tmp_path / "out").glob(".*"))

    hf = Mistral3ForConditionalGeneration.from_pretrained(out, dtype=torch.bfloat16)
    hf_sd = hf.state_dict()
    reference = dequantized_reference(hf_model, torch.bfloat16)
    assert sorted(hf_sd) == sorted(reference)
    for key, value in hf_sd.items():
        assert torch.equal(value, reference[key]), key


def test_save_fp8_round_trip(fp8_dir, hf_model, tmp_path):
    from transformers import FineGrainedFP8Config, Mistral3ForConditionalGeneration

    ckpt = _checkpointer(fp8_dir, tmp_path / "out", save_fp8=True)
    loaded = _materialise(ckpt.load_checkpoint()[training.MODEL_KEY])
    ckpt.save_checkpoint({training.MODEL_KEY: loaded}, epoch=1)
    out = tmp_path / "out" / "epoch_1"
    src_index = json.loads((fp8_dir / "model.safetensors.index.json").read_text())["weight_map"]
    out_index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(src_index) == sorted(out_index)  # same keys: weights, weight_scale_inv, activation_scale
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weight_block_size"] is None

    def raw(directory, index, key):
        with safe_open(directory / index[key], framework="pt") as f:
            return f.get_tensor(key)

    for key in src_index:
        ours, theirs = raw(out, out_index, key), raw(fp8_dir, src_index, key)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, key
        if key.endswith("activation_scale"):
            assert torch.equal(ours, theirs), key
    # Re-quantising the dequantised weights reproduces the source's FP8 bits: its amax sits on the grid.
    for key in (k for k in src_index if k.endswith("proj.weight") and "language_model" in k):
        assert torch.equal(raw(out, out_index, key).view(torch.uint8), raw(fp8_dir, src_index, key).view(torch.uint8))

    qcfg = FineGrainedFP8Config(dequantize=True, weight_block_size=None, activation_scheme="static")
    hf = Mistral3ForConditionalGeneration.from_pretrained(out, quantization_config=qcfg, dtype=torch.bfloat16)
    reference = dequantized_reference(hf_model, torch.bfloat16)
    for key, value in hf.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_failed_save_leaves_previous_checkpoint_intact(fp8_dir, tmp_path, monkeypatch):
    ckpt = _checkpointer(fp8_dir, tmp_path / "out", max_shard_size_gb=40e3 / 1024**3)
    loaded = _materialise(ckpt.load_checkpoint()[training.MODEL_KEY])
    ckpt.save_checkpoint({training.MODEL_KEY: loaded}, epoch=0)
    out = tmp_path / "out" / "epoch_0"
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    changed = {k: v + 1 for k, v in loaded.items()}
    calls = {"n": 0}
    real_save_file = writer_module.save_file

    def failing_save_file(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first shard is written, the second one crashes
            raise OSError("disk full (simulated)")
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(writer_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint({training.MODEL_KEY: changed}, epoch=0)
    assert calls["n"] == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # The next save succeeds, replaces the checkpoint and clears the partial directory.
    monkeypatch.setattr(writer_module, "save_file", real_save_file)
    ckpt.save_checkpoint({training.MODEL_KEY: changed}, epoch=0)
    reread = HFCheckpointReader(out)
    assert torch.equal(reread.read("decoder.norm.scale"), changed["decoder.norm.scale"].to(torch.bfloat16))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["epoch_0"]


def test_resume_loads_latest_epoch_and_recipe_state(fp8_dir, tmp_path):
    ckpt = _checkpointer(fp8_dir, tmp_path / "out")
    loaded = _materialise(ckpt.load_checkpoint()[training.MODEL_KEY])
    trained = {k: v * 2 for k, v in loaded.items()}
    ckpt.save_checkpoint({training.MODEL_KEY: loaded}, epoch=0)
    ckpt.save_checkpoint({training.MODEL_KEY: trained, training.EPOCHS_KEY: 2, training.SEED_KEY: 7}, 1, True)
    resumed = _checkpointer(fp8_dir, tmp_path / "out", should_load_recipe_state=True).load_checkpoint()
    assert resumed[training.EPOCHS_KEY] == 2 and resumed[training.SEED_KEY] == 7
    for key in ("decoder.layers.0.attn.q_proj.weight", "decoder.tok_embeddings.weight"):
        assert torch.equal(resumed[training.MODEL_KEY][key], trained[key].to(torch.bfloat16))


def test_constructor_errors(fp8_dir, tmp_path):
    with pytest.raises(ValueError, match="output directory cannot be the same"):
        _checkpointer(fp8_dir, fp8_dir / "out")
    with pytest.raises(ValueError, match="safetensors only"):
        _checkpointer(fp8_dir, tmp_path / "out", safe_serialization=False)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        _checkpointer(fp8_dir, tmp_path / "out", checkpoint_files=["nope.safetensors"])
    ckpt = _checkpointer(
        fp8_dir,
        tmp_path / "out",
        checkpoint_files={"filename_format": "model-{}-of-{}.safetensors", "max_filename": "00002"},
    )
    assert len(ckpt.reader) == len(HFCheckpointReader(fp8_dir))
