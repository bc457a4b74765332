"""RoPE tables and the Llama-4 query scale against transformers' own functions."""

import math

import pytest
import torch
from torchtune_mistral3.models.mistral3 import (
    Llama4QueryScale,
    PixtralRotaryPositionalEmbeddings,
    YarnRotaryPositionalEmbeddings,
)
from torchtune_mistral3.models.mistral3._position_embeddings import pixtral_patch_positions
from transformers import Ministral3Config, PixtralVisionConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.ministral3.modeling_ministral3 import Ministral3RotaryEmbedding, get_llama_4_attn_scale
from transformers.models.pixtral.modeling_pixtral import PixtralVisionRotaryEmbedding

# (theta, factor, L0, beta_fast, beta_slow, mscale, mscale_all_dim, head_dim): MM3.5-like (both config
# revisions), Ministral-3, a tiny test config, and a narrow band where truncation matters.
YARN_CASES = [
    (1e6, 64.0, 4096, 4.0, 1.0, 1.0, 0.0, 128),
    (1e6, 64.0, 4096, 4.0, 1.0, 1.0, 1.0, 128),
    (1e6, 16.0, 16384, 32.0, 1.0, 1.0, 1.0, 128),
    (1e6, 64.0, 16, 4.0, 1.0, 1.0, 0.0, 24),
    (1e8, 48.0, 8192, 32.0, 1.0, 0.707, 0.707, 104),
]


def _hf_text_config(theta, factor, l0, beta_fast, beta_slow, mscale, mscale_all_dim, head_dim, **extra):
    return Ministral3Config(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=512,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=theta,
            factor=factor,
            original_max_position_embeddings=l0,
            beta_fast=beta_fast,
            beta_slow=beta_slow,
            mscale=mscale,
            mscale_all_dim=mscale_all_dim,
            llama_4_scaling_beta=0.1,
            **extra,
        ),
    )


@pytest.mark.parametrize("case", YARN_CASES)
@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_tables_equal_transformers(case, truncate):
    theta, factor, l0, beta_fast, beta_slow, mscale, mscale_all_dim, head_dim = case
    config = _hf_text_config(*case, truncate=truncate)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    rope = YarnRotaryPositionalEmbeddings(
        dim=head_dim,
        max_seq_len=512,
        base=theta,
        scaling_factor=factor,
        original_max_seq_len=l0,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
        mscale=mscale,
        mscale_all_dim=mscale_all_dim,
        truncate=truncate,
    )
    torch.testing.assert_close(rope.inverse_frequencies(), inv_freq, rtol=0, atol=0)
    assert rope.attention_factor == attention_factor

    hf_rope = Ministral3RotaryEmbedding(config)
    positions = torch.arange(512)[None]
    cos, sin = hf_rope(torch.zeros(1, dtype=torch.float32), positions)
    half = head_dim // 2
    torch.testing.assert_close(rope.cos, cos[0, :, :half], rtol=0, atol=0)
    torch.testing.assert_close(rope.sin, sin[0, :, :half], rtol=0, atol=0)


def test_mm35_attention_factor_is_the_documented_value():
    # Reference value: 0.1 * ln 64 + 1 with mscale_all_dim = 0, and 1.0 with mscale_all_dim = 1.
    rope0 = YarnRotaryPositionalEmbeddings(128, 8, 1e6, 64.0, 4096, 4.0, 1.0, 1.0, 0.0)
    rope1 = YarnRotaryPositionalEmbeddings(128, 8, 1e6, 64.0, 4096, 4.0, 1.0, 1.0, 1.0)
    assert rope0.attention_factor == pytest.approx(0.1 * math.log(64) + 1)
    assert rope1.attention_factor == 1.0


def test_rotation_equals_rotate_half_formula():
    rope = YarnRotaryPositionalEmbeddings(16, 64, 1e6, 64.0, 16, 4.0, 1.0, 1.0, 0.0)
    x = torch.randn(2, 40, 3, 16)
    positions = torch.randint(0, 64, (2, 40))
    cos = torch.cat([rope.cos[positions]] * 2, -1)[:, :, None]
    sin = torch.cat([rope.sin[positions]] * 2, -1)[:, :, None]
    rotate_half = torch.cat((-x[..., 8:], x[..., :8]), -1)
    torch.testing.assert_close(rope(x, input_pos=positions), x * cos + rotate_half * sin, rtol=0, atol=0)
    torch.testing.assert_close(rope(x), rope(x, input_pos=torch.arange(40).expand(2, 40)), rtol=0, atol=0)


def test_llama4_query_scale_equals_transformers():
    scale = Llama4QueryScale(beta=0.1, original_max_seq_len=16, max_seq_len=300)
    positions = torch.arange(300)[None]
    expected = get_llama_4_attn_scale(positions, 0.1, 16)  # [1, 1, s, 1]
    q = torch.randn(1, 300, 2, 8)
    torch.testing.assert_close(scale(q), q * expected.transpose(1, 2), rtol=0, atol=0)
    assert torch.all(scale.scale[:16] == 1) and scale.scale[16] > 1


def test_pixtral_rope_equals_transformers():
    config = PixtralVisionConfig(hidden_size=64, num_attention_heads=2, image_size=112, patch_size=14)
    hf_rope = PixtralVisionRotaryEmbedding(config)
    grids = [(4, 6), (6, 4), (8, 8)]
    hf_positions = torch.cat(
        [torch.stack(torch.meshgrid(torch.arange(r), torch.arange(c), indexing="ij"), -1).flatten(0, 1)
         for r, c in grids]
    )
    cos, sin = hf_rope(torch.zeros(1), hf_positions)
    rope = PixtralRotaryPositionalEmbeddings(dim=32, max_patches_per_side=8)
    positions = pixtral_patch_positions(grids, 8)
    torch.testing.assert_close(rope.cos[positions], cos[:, :16], rtol=0, atol=0)
    torch.testing.assert_close(rope.sin[positions], sin[:, :16], rtol=0, atol=0)
    with pytest.raises(ValueError, match="larger than"):
        pixtral_patch_positions([(9, 2)], 8)


def test_tables_rebuild_on_the_default_device_in_fp32():
    with torch.device("meta"):
        rope = YarnRotaryPositionalEmbeddings(16, 32, 1e6, 64.0, 16, 4.0, 1.0, 1.0, 0.0)
    assert rope.cos.is_meta
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        rope.rope_init()
        scale = Llama4QueryScale(0.1, 16, 32)
    finally:
        torch.set_default_dtype(previous)
    assert rope.cos.device.type == "cpu" and rope.cos.dtype == torch.float32
    assert scale.scale.dtype == torch.float32
