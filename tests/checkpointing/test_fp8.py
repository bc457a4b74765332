"""FP8 helpers against the formulas written out independently (the transformers comparison is in test_reader.py)."""

import pytest
import torch
from _tiny_checkpoints import quantize, quantize_blocks
from omegaconf import OmegaConf
from torchtune import config as tune_config
from torchtune_mistral3.checkpointing import Mistral3HFCheckpointer, dequantize, quantize_per_tensor


def test_block_dequant_with_partial_edge_blocks():
    # 40 x 50 with 16 x 32 blocks: the last block row and column are partial (ceil-divided grid 3 x 2).
    w = torch.randn(40, 50) * 3
    q, grid = quantize_blocks(w, (16, 32))
    assert grid.shape == (3, 2)
    expected = torch.empty(40, 50)
    for i in range(40):
        for j in range(50):
            expected[i, j] = q[i, j].float() * grid[i // 16, j // 32]
    assert torch.equal(dequantize(q, grid, block_size=[16, 32]), expected)
    assert torch.equal(dequantize(q[17:39, 30:45], grid, block_size=[16, 32], offset=(17, 30)), expected[17:39, 30:45])
    with pytest.raises(ValueError, match="no weight_block_size"):
        dequantize(q, grid)


def test_quantize_per_tensor_matches_the_mistral_formula():
    w = (torch.randn(64, 48) * 0.05).to(torch.bfloat16)
    q, scale = quantize_per_tensor(w)
    q_ref, scale_ref = quantize(w)
    assert scale.shape == () and scale.dtype == torch.bfloat16 and torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    # The largest magnitude lands on (about) the top of the E4M3 range.
    assert 440 <= q.float().abs().max() <= 448
    zero_q, zero_scale = quantize_per_tensor(torch.zeros(3, 3))
    assert zero_scale == 1 and torch.equal(dequantize(zero_q, zero_scale), torch.zeros(3, 3))


def test_dequantize_rounds_once():
    # fp32 scale 1 + 2^-8 + 2^-10 (0.625 bf16 ulp above 1): bf16(scale) = 1 + 2^-7, so rounding the scale (or the
    # product) first gives a different bf16 weight. Hand-derived single rounding of q * scale to bf16:
    #   1.5 * s = 1.50732421875 -> 1.5078125   (double rounding: 1.5 * 1.0078125 = 1.51171875, a tie -> 1.515625)
    #  -3.5 * s = -3.51708984375 -> -3.515625  (double: -3.52734375 -> -3.53125)
    #   448 * s = 450.1875 -> 450.0            (double: 451.5 -> 452.0)
    # 0.0625 * s = 0.06280517578125 -> 0.06298828125 (the same either way)
    q = torch.tensor([[1.5, -3.5], [448.0, 0.0625]]).to(torch.float8_e4m3fn)
    scale = torch.tensor(1 + 2**-8 + 2**-10, dtype=torch.float32)
    expected = torch.tensor([[1.5078125, -3.515625], [450.0, 0.06298828125]], dtype=torch.bfloat16)
    double_rounded = q.to(torch.bfloat16) * scale.to(torch.bfloat16)
    assert not torch.equal(double_rounded, expected)  # the case can tell the two apart
    assert torch.equal(dequantize(q, scale, torch.bfloat16), expected)
    assert torch.equal(dequantize(q, scale.reshape(1)).to(torch.bfloat16), expected)


def test_checkpointer_instantiates_as_a_recipe_component(tmp_path):
    from _tiny_checkpoints import tiny_hf_model, write_checkpoint

    src = write_checkpoint(tiny_hf_model(), tmp_path / "src")
    cfg = OmegaConf.create(
        {
            "_component_": "torchtune_mistral3.checkpointing.Mistral3HFCheckpointer",
            "checkpoint_dir": str(src),
            "output_dir": str(tmp_path / "out"),
            "model_type": "MISTRAL3",
            "save_fp8": True,
        }
    )
    # CheckpointClient adds should_load_recipe_state; the recipe reads model_type as a string.
    ckpt = tune_config.instantiate(cfg, should_load_recipe_state=False)
    assert isinstance(ckpt, Mistral3HFCheckpointer)
    assert ckpt._checkpoint_dir == src and ckpt._output_dir == tmp_path / "out"
    assert "decoder.norm.scale" in ckpt.load_checkpoint()["model"]
