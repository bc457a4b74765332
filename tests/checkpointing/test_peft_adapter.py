"""The LoRA run's outputs against transformers + peft: the PEFT adapter and the merged export (tiny model, fp32).

One `tune run lora_finetune_distributed` of the LoRA demo (FP8 base, a few steps, so B != 0); the plugin's
logits come from the base checkpoint loaded as the recipe loads it (FP8 bytes and scales) and the adapters of the
run's own saved training state (which holds the trainable parameters only).
"""

import json

import pytest
import torch
from torchtune_mistral3.checkpointing._peft import peft_key

pytestmark = pytest.mark.integration

CONFIG = "mistral3p5_medpix_lora_demo"
RTOL = 1e-5


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import run_tune

    out = tmp_path_factory.mktemp("lora_run")
    run_tune("run", "lora_finetune_distributed", "--config", CONFIG, f"output_dir={out}", "dtype=fp32",
             "run_val_every_n_steps=null", "max_steps_per_epoch=3", "batch_size=2", "checkpointer.save_dtype=fp32")
    return out


def _batch():
    """One sample with a 56x84 image (2 x 3 merged patches) between text tokens, one text-only sample."""
    g = torch.Generator().manual_seed(0)
    image = ([10] * 3 + [12]) * 2
    image[-1] = 13
    text = lambda n: torch.randint(1000, 5000, (n,), generator=g).tolist()  # noqa: E731
    tokens = torch.tensor([[1] + text(4) + image + text(30), [1] + text(42)])
    pixels = torch.randn(1, 3, 56, 84, generator=g)
    return tokens, pixels, torch.tensor([[56, 84]])


def _plugin_logits(run):
    from torchtune_mistral3.checkpointing import (
        HFCheckpointReader,
        adapter_keys,
        load_lora_checkpoint,
        mistral3_lora_from_hf_config,
    )
    from torchtune_mistral3.reference_check import load_run_config

    cfg = load_run_config(CONFIG, [f"output_dir={run}"])
    kwargs = {k: v for k, v in cfg.model.items() if k not in ("_component_", "checkpoint_dir")}
    kwargs["lora_attn_modules"] = list(kwargs["lora_attn_modules"])
    model = mistral3_lora_from_hf_config(str(run / "tiny_fp8_checkpoint"), **kwargs)
    # the base as the recipe loads it (FP8 bytes and scales), then the adapters as trained: the training state
    # holds the trainable parameters only
    load_lora_checkpoint(model, HFCheckpointReader(str(run / "tiny_fp8_checkpoint")), dtype=torch.float32, seed=0)
    assert model.decoder.layers[0].attn.q_proj.weight.dtype == torch.float8_e4m3fn  # trained on the FP8 base
    (state_dir,) = (run / "training_state").iterdir()
    state = torch.load(state_dir / "rank_00000.pt", weights_only=False)["model"][0]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert set(adapter_keys(model)) <= set(state) and not frozen & set(state)  # no base weight in the state
    model.load_state_dict(state, strict=False)
    for m in model.modules():
        if hasattr(m, "rope_init"):
            m.rope_init()
    tokens, pixels, sizes = _batch()
    with torch.no_grad():
        logits = model.eval()(tokens, encoder_input={"image": {"pixel_values": pixels, "image_sizes": sizes}})
    return logits, state


def _hf_logits(model):
    tokens, pixels, sizes = _batch()
    with torch.no_grad():
        return model(input_ids=tokens, pixel_values=pixels, image_sizes=sizes).logits


def _hf_base(run):
    from transformers import FineGrainedFP8Config, Mistral3ForConditionalGeneration

    fp8 = FineGrainedFP8Config(dequantize=True, weight_block_size=None, activation_scheme="static")
    return Mistral3ForConditionalGeneration.from_pretrained(
        run / "tiny_fp8_checkpoint", dtype=torch.float32, attn_implementation="eager", quantization_config=fp8
    ).eval()


def test_peft_adapter_on_the_base_gives_the_plugin_logits(run):
    from peft import PeftModel
    from safetensors.torch import load_file

    adapter_dir = run / "epoch_0" / "adapter"
    expected, state = _plugin_logits(run)
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    adapters = {k: v for k, v in state.items() if k.endswith(("lora_a.weight", "lora_b.weight"))}
    assert {peft_key(k) for k in adapters} == set(saved)
    assert all(torch.equal(saved[peft_key(k)], v) for k, v in adapters.items())
    assert all(v.abs().max() > 0 for k, v in adapters.items() if k.endswith("lora_b.weight"))  # it trained

    model = PeftModel.from_pretrained(_hf_base(run), str(adapter_dir)).eval()
    lora_layers = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert len(lora_layers) == len(adapters) // 2  # every adapter was placed, none on the vision tower
    assert not any("vision_tower" in n or "lm_head" in n for n in lora_layers)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 32
    actual = _hf_logits(model)
    assert _rel(actual, expected) < RTOL


def test_merged_export_loads_in_transformers_with_the_same_logits(run):
    from transformers import Mistral3ForConditionalGeneration

    expected, _ = _plugin_logits(run)
    merged = Mistral3ForConditionalGeneration.from_pretrained(
        run / "epoch_0", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    base = _hf_logits(_hf_base(run))
    assert _rel(base, expected) > 1e-3  # the adapters changed the model, so the comparison below means something
    assert _rel(_hf_logits(merged), expected) < RTOL
