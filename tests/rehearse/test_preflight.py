"""Planned checkpoint reads and the tokenizer/config check, on a header-only checkpoint of the demo's widths."""

import json
from pathlib import Path

import pytest
import torch
from torchtune_mistral3.checkpointing import DEMO_HF_CONFIG, HFCheckpointReader, RawFP8Source
from torchtune_mistral3.models.mistral3 import mistral3_transform
from torchtune_mistral3.rehearse import write_header_only_checkpoint
from torchtune_mistral3.rehearse._preflight import check_tokenizer_matches_config
from torchtune_mistral3.rehearse._reads import PlannedReader

Q = "decoder.layers.0.attn.q_proj.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = {**DEMO_HF_CONFIG, "quantization_config": {"quant_method": "fp8", "weight_block_size": None}}
    return write_header_only_checkpoint(str(tmp_path_factory.mktemp("tiny")), hf_config=config)


def test_planned_read_records_the_block_and_reads_no_byte(tiny):
    reader = PlannedReader(HFCheckpointReader(tiny), rank=5)
    out, width = 4 * 24, 64  # DEMO_HF_CONFIG: 4 heads x head_dim 24, hidden 64
    value = reader.read(Q, torch.bfloat16, offset=(out // 2, 0), shape=(out // 2, width))
    assert value.shape == (out // 2, width) and value.dtype == torch.bfloat16
    (r,) = reader.reads
    assert (r.hf_key, r.stored_dtype, r.offset) == ("model.language_model.layers.0.self_attn.q_proj.weight",
                                                     torch.float8_e4m3fn, (out // 2, 0))
    assert r.nbytes == out // 2 * width  # one byte per FP8 element
    with pytest.raises(ValueError, match=r"rank 5: .*model-00001-of-00001\.safetensors.*lies outside"):
        reader.read(Q, torch.bfloat16, offset=(out // 2 + 1, 0), shape=(out // 2, width))
    with pytest.raises(KeyError, match=r"rank 5: .*no weight for 'decoder\.layers\.9\.attn\.q_proj\.weight'"):
        reader.read("decoder.layers.9.attn.q_proj.weight")


def test_planned_fp8_base_refuses_what_the_real_source_refuses(tiny):
    planned = RawFP8Source(PlannedReader(HFCheckpointReader(tiny), rank=3))
    real = RawFP8Source(HFCheckpointReader(tiny))
    key = "decoder.output.weight"  # bf16 on disk: a frozen FP8 base cannot hold it
    with pytest.raises(ValueError, match="not FP8") as expected:
        real.read(key, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"rank 3: .*lm_head\.weight.*not FP8"):
        planned.read(key, torch.float8_e4m3fn)
    assert "model.fp8_base=False" in str(expected.value)
    assert planned.read(Q, torch.float8_e4m3fn).dtype == torch.float8_e4m3fn


def test_tokenizer_whose_image_geometry_differs_from_config_json_is_refused(tiny):
    tekken = str(Path(tiny) / "tekken.json")
    check_tokenizer_matches_config(mistral3_transform(tekken, max_seq_len=512), str(tiny))
    with pytest.raises(ValueError, match=r"tokenizer.patch_size is 16 .*vision_config.patch_size=14"):
        check_tokenizer_matches_config(mistral3_transform(tekken, max_seq_len=512, patch_size=16), str(tiny))
    config = json.loads((Path(tiny) / "config.json").read_text())
    assert config["spatial_merge_size"] == 2 and config["image_token_index"] == 10


def test_a_weight_no_rank_reads_is_named_with_its_file(tiny):
    from omegaconf import OmegaConf
    from torchtune_mistral3.rehearse._rehearse import RehearsalError, check_reads_cover_checkpoint
    from torchtune_mistral3.rehearse._role import RoleReport

    reader = PlannedReader(HFCheckpointReader(tiny), rank=0)
    for key in reader.keys():
        if key != "decoder.norm.scale":
            reader.read(key)
    report = RoleReport(rank=0, coordinate={"pp": 0}, stages=[0], layers=[(0, 2)], reads=reader.reads)
    cfg = OmegaConf.create({"checkpointer": {"checkpoint_dir": str(tiny)}})
    with pytest.raises(RehearsalError, match=r"1 weights .*'model\.language_model\.norm\.weight' \(model-00001"):
        check_reads_cover_checkpoint(cfg, [report])
    reader.read("decoder.norm.scale")
    check_reads_cover_checkpoint(cfg, [report])
