"""FP8 checkpoint -> plugin model -> saved HF checkpoint -> transformers: the same logits."""

import pytest
import torch
from _tiny_checkpoints import tiny_hf_model, write_checkpoint
from torchtune import training
from torchtune_mistral3.checkpointing import (
    HFCheckpointReader,
    Mistral3HFCheckpointer,
    load_into_module,
    mistral3_from_hf_config,
)

IMG, IMG_BREAK, IMG_END = 10, 12, 13


def _batch():
    """One sample: text, a 56x84 px image (2 x 3 merged patches), text; ids >= 20 are plain text."""
    g = torch.Generator().manual_seed(0)
    block = ([IMG] * 3 + [IMG_BREAK]) * 2
    block[-1] = IMG_END
    text = lambda n: torch.randint(20, 256, (n,), generator=g).tolist()  # noqa: E731
    tokens = torch.tensor([[1] + text(5) + block + text(24)])  # 38 tokens > YaRN L0 = 16
    pixels = torch.randn(1, 3, 56, 84, generator=g)
    sizes = torch.tensor([[56, 84]])
    encoder_input = {"image": {"pixel_values": pixels, "image_sizes": sizes, "images_per_sample": torch.tensor([1])}}
    return tokens, encoder_input


def _plugin_model(checkpoint_dir, dtype):
    """Build on meta and load slice-wise, as the recipe does; RoPE tables are rebuilt after."""
    with training.set_default_dtype(torch.float32), torch.device("meta"):
        model = mistral3_from_hf_config(str(checkpoint_dir))
    load_into_module(model, HFCheckpointReader(checkpoint_dir), dtype)
    for module in model.modules():
        if hasattr(module, "rope_init"):
            module.rope_init()
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_logits_equal_after_save_and_transformers_load(tmp_path, dtype):
    from transformers import Mistral3ForConditionalGeneration

    src = write_checkpoint(tiny_hf_model(), tmp_path / "src", shards=2)
    model = _plugin_model(src, dtype)
    assert all(p.dtype == dtype for p in model.parameters())

    ckpt = Mistral3HFCheckpointer(str(src), output_dir=str(tmp_path / "out"), save_dtype=None)
    ckpt.save_checkpoint({training.MODEL_KEY: model.state_dict()}, epoch=0)
    hf = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "out" / "epoch_0", dtype=torch.float32).eval()

    tokens, encoder_input = _batch()
    image = encoder_input["image"]
    with torch.no_grad():
        expected = hf(input_ids=tokens, pixel_values=image["pixel_values"], image_sizes=image["image_sizes"]).logits
        actual = model.float()(tokens, encoder_input=encoder_input)
    # Same weights bit for bit; the two implementations agree to fp32 rounding (as in the model parity tests).
    rel = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert rel < 1e-5, rel
    hf_weights = hf.state_dict()
    assert torch.equal(hf_weights["lm_head.weight"], model.decoder.output.weight)
