"""Damaged inputs and failed saves: the message names the file, says what is intact, and nothing half-written stays."""

import os

import pytest
import torch
from _tiny_checkpoints import TinyTextModel, tiny_hf_model, write_checkpoint
from safetensors import SafetensorError
from torchtune import training
from torchtune_mistral3.checkpointing import HFCheckpointReader, Mistral3HFCheckpointer, load_into_module
from torchtune_mistral3.checkpointing import _writer as writer_module


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model()


@pytest.fixture
def bf16_dir(hf_model, tmp_path):
    return write_checkpoint(hf_model, tmp_path / "src", shards=2, fp8=False)


def _save(src, out, state, **kwargs):
    ckpt = Mistral3HFCheckpointer(checkpoint_dir=str(src), output_dir=str(out), max_shard_size_gb=40e3 / 1024**3)
    ckpt.save_checkpoint({training.MODEL_KEY: state}, epoch=0)


def test_malformed_config_json_is_named_with_its_line(bf16_dir):
    path = bf16_dir / "config.json"
    path.write_text(path.read_text()[:-40])  # cut short, as by an interrupted copy
    with pytest.raises(ValueError, match=rf"'{path}' is not valid JSON \(.* at line \d+, column \d+\)"):
        HFCheckpointReader(bf16_dir)
    (bf16_dir / "config.json").write_text("{}")
    index = bf16_dir / "model.safetensors.index.json"
    index.write_text("{")
    with pytest.raises(ValueError, match=rf"'{index}' is not valid JSON"):
        HFCheckpointReader(bf16_dir)


def test_nan_weights_in_the_input_checkpoint_are_named(tmp_path):
    model = tiny_hf_model()
    with torch.no_grad():
        model.model.language_model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    src = write_checkpoint(model, tmp_path / "src", shards=2, fp8=False)
    with pytest.raises(ValueError) as info:
        load_into_module(TinyTextModel(), HFCheckpointReader(src))
    message = str(info.value)
    assert "'model.language_model.layers.1.mlp.down_proj.weight' holds 1 non-finite values (NaN or inf)" in message
    assert "safetensors'" in message and "is damaged" in message


def test_saved_weight_files_are_readable_like_the_other_files(bf16_dir, tmp_path):
    state = {k: v.clone() for k, v in Mistral3HFCheckpointer(str(bf16_dir), output_dir=str(tmp_path)).load_checkpoint()[
        training.MODEL_KEY].items()}
    _save(bf16_dir, tmp_path / "out", state)
    saved = tmp_path / "out" / "epoch_0"
    modes = {p.name: p.stat().st_mode & 0o777 for p in saved.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes  # 0644 under the usual umask 022
    assert any(n.endswith(".safetensors") for n in modes) and "config.json" in modes


@pytest.mark.parametrize("previous", [False, True])
def test_a_full_disk_during_a_save_names_the_file_and_leaves_no_partial_directory(
    bf16_dir, tmp_path, monkeypatch, previous
):
    state = {k: v.clone() for k, v in Mistral3HFCheckpointer(str(bf16_dir), output_dir=str(tmp_path)).load_checkpoint()[
        training.MODEL_KEY].items()}
    out = tmp_path / "out"
    if previous:
        _save(bf16_dir, out, state)
    before = {p.name: p.read_bytes() for p in (out / "epoch_0").iterdir()} if previous else None
    real_save_file, calls = writer_module.save_file, []

    def full_disk(tensors, path, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the first shard fits, the second does not (safetensors' own error type)
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        return real_save_file(tensors, path, **kwargs)

    monkeypatch.setattr(writer_module, "save_file", full_disk)
    with pytest.raises(OSError) as info:
        _save(bf16_dir, out, {k: v + 1 for k, v in state.items()})
    message = str(info.value)
    assert f"{calls[1]}: SafetensorError: Error while serializing" in message and "is the disk full?" in message
    if previous:
        assert f"the previous checkpoint '{out / 'epoch_0'}' is intact" in message
        assert {p.name: p.read_bytes() for p in (out / "epoch_0").iterdir()} == before
    else:
        assert f"'{out / 'epoch_0'}' was not created" in message
    assert sorted(p.name for p in out.iterdir()) == (["epoch_0"] if previous else [])  # no .epoch_0.partial


def test_non_finite_count_covers_raw_fp8_bytes():
    from torchtune_mistral3.checkpointing._load import _non_finite

    values = torch.tensor([float("nan"), 1.0, float("inf"), -2.0])
    assert _non_finite(values) == _non_finite(values.to(torch.bfloat16)) == 2
    # e4m3fn has no inf (the cast saturates it to 448); its NaN bytes are counted (torch.isfinite refuses fp8)
    assert _non_finite(values.to(torch.float8_e4m3fn)) == 1
    assert _non_finite(torch.tensor([1.0, 448.0]).to(torch.float8_e4m3fn)) == 0
    assert _non_finite(torch.tensor([1, 2])) == 0
