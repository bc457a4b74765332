"""LoRA builders: with B = 0 the adapted model is exactly the base model; only adapters train (fp32, tiny models)."""

import tempfile

import pytest
import torch
from _hf_reference import PAD, plugin_from_hf, tiny_batch, tiny_hf_config, tiny_hf_model
from torchtune.modules.peft import LoRALinear, get_adapter_params
from torchtune_mistral3.checkpointing import mistral3_lora_from_hf_config, quantize_per_tensor
from torchtune_mistral3.models.mistral3 import mistral3_hf_to_tune
from torchtune_mistral3.peft import FP8LoRALinear, FrozenFP8Linear

ALL_ATTN = ["q_proj", "k_proj", "v_proj", "output_proj"]


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(tiny_hf_config(head_dim=24, mscale_all_dim=0.0, projector_bias=True))


def _lora_model(hf, **kwargs):
    """LoRA model for ``hf``'s config with ``hf``'s weights; the adapters keep their initialisation."""
    with tempfile.TemporaryDirectory() as tmp:
        hf.config.save_pretrained(tmp)
        model = mistral3_lora_from_hf_config(tmp, **kwargs)
    state = mistral3_hf_to_tune({k: v.detach().clone() for k, v in hf.state_dict().items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) == set(get_adapter_params(model)), missing
    return model.eval()


def _fp8_state(hf):
    """HF weights with every decoder-layer linear quantised to per-tensor FP8 (bf16 scale), as Mistral ships them."""
    state, fp8 = {}, {}
    for k, v in hf.state_dict().items():
        key = mistral3_hf_to_tune({k: v})
        (tune_key,) = key
        if tune_key.startswith("decoder.layers.") and (tune_key.endswith("proj.weight") or ".mlp.w" in tune_key):
            q, s = quantize_per_tensor(v)
            fp8[tune_key] = (q, s)
        state[tune_key] = v.detach().clone()
    return state, fp8


def _logits(model, batch):
    with torch.no_grad():
        return model(batch["tokens"], encoder_input=batch["encoder_input"])


def _loss(logits, tokens):
    labels = tokens[:, 1:].masked_fill(tokens[:, 1:] == PAD, -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lora_attn_modules=["q_proj", "v_proj"]),
        dict(lora_attn_modules=ALL_ATTN, apply_lora_to_mlp=True, apply_lora_to_output=True),
        dict(lora_attn_modules=ALL_ATTN, apply_lora_to_mlp=True, vision_trainable="lora", projector_trainable="lora"),
    ],
    ids=["qv", "all_text", "text_vision_projector"],
)
def test_zero_b_gives_exactly_the_base_model(hf, kwargs):
    base = plugin_from_hf(hf)
    lora = _lora_model(hf, lora_rank=4, lora_alpha=8.0, **kwargs)
    for name, p in lora.named_parameters():
        if name.endswith("lora_b.weight"):
            assert torch.equal(p, torch.zeros_like(p)), name
    batch = tiny_batch()
    expected, actual = _logits(base, batch), _logits(lora, batch)
    assert torch.equal(actual, expected)
    assert _loss(actual, batch["tokens"]).item() == _loss(expected, batch["tokens"]).item()
    # the adapters are live: a non-zero B moves the logits
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith("lora_b.weight"):
                p.normal_(0, 0.1)
    assert not torch.allclose(_logits(lora, batch), expected)


def test_only_adapters_train_by_default_and_vision_is_excluded(hf):
    lora = _lora_model(hf, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable == set(get_adapter_params(lora))
    assert trainable and all(n.startswith("decoder.layers.") for n in trainable)
    assert not any(isinstance(m, LoRALinear) for m in lora.encoders.modules())
    layer = lora.decoder.layers[0]
    assert isinstance(layer.attn.q_proj, LoRALinear) and not isinstance(layer.attn.k_proj, LoRALinear)
    assert isinstance(layer.mlp.w2, LoRALinear)


def test_full_projector_and_lora_vision_are_switchable(hf):
    lora = _lora_model(hf, lora_attn_modules=["q_proj"], vision_trainable="lora", projector_trainable="full")
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    projector = {n for n, _ in lora.named_parameters() if n.startswith("encoders.image.projector.")}
    assert projector <= trainable
    assert any(n.startswith("encoders.image.vision.layers.0.attn.q_proj.lora_a") for n in trainable)
    assert not any("vision" in n and not n.endswith(("lora_a.weight", "lora_b.weight")) for n in trainable)


def test_bad_arguments_are_named(hf):
    with pytest.raises(ValueError, match="lora_attn_modules has \\['o_proj'\\]"):
        _lora_model(hf, lora_attn_modules=["o_proj"])
    with pytest.raises(ValueError, match="vision_trainable='yes'"):
        _lora_model(hf, lora_attn_modules=["q_proj"], vision_trainable="yes")
    with pytest.raises(ValueError, match="fp8_base=False"):
        _lora_model(hf, lora_attn_modules=["q_proj"], fp8_base=True)  # this config.json declares no FP8


def _fp8_pair(hf):
    """The FP8-base LoRA model and the compute-dtype-base LoRA model on the dequantised weights, same adapters."""
    state, fp8 = _fp8_state(hf)
    with tempfile.TemporaryDirectory() as tmp:
        hf.config.save_pretrained(tmp)
        cfg = hf.config.to_dict()
        cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": None}
        import json
        import pathlib

        pathlib.Path(tmp, "config.json").write_text(json.dumps(cfg))
        kwargs = dict(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8.0)
        fp8_model = mistral3_lora_from_hf_config(tmp, fp8_base=True, **kwargs)
        plain = mistral3_lora_from_hf_config(tmp, **kwargs)
    dequantized = dict(state)
    fp8_state = dict(state)
    for key, (q, s) in fp8.items():
        dequantized[key] = q.float() * s.float()
        fp8_state[key] = q
        fp8_state[key + "_scale_inv"] = s.float()
    plain.load_state_dict(dequantized, strict=False)
    fp8_model.load_state_dict(fp8_state, strict=False)
    with torch.no_grad():
        for (n1, p1), (n2, p2) in zip(plain.named_parameters(), fp8_model.named_parameters()):
            assert n1 == n2
            if n1.endswith("lora_b.weight"):
                p1.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n1)))
            if n1.endswith(("lora_a.weight", "lora_b.weight")):
                p2.copy_(p1)
    return fp8_model, plain


def test_fp8_base_equals_the_dequantized_base(hf):
    fp8_model, plain = _fp8_pair(hf)
    layer = fp8_model.decoder.layers[0]
    assert isinstance(layer.attn.q_proj, FP8LoRALinear) and type(layer.attn.k_proj) is FrozenFP8Linear
    assert layer.attn.k_proj.weight.dtype == torch.float8_e4m3fn and not layer.attn.k_proj.weight.requires_grad
    assert {n for n, p in fp8_model.named_parameters() if p.requires_grad} == set(get_adapter_params(fp8_model))
    batch = tiny_batch()
    torch.testing.assert_close(_logits(fp8_model, batch), _logits(plain, batch), rtol=0, atol=1e-5)
    for m in (fp8_model, plain):
        _loss(m(batch["tokens"], encoder_input=batch["encoder_input"]), batch["tokens"]).backward()
    grads = dict(plain.named_parameters())
    for name, p in fp8_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_scaled_mm_base_matmul_equals_the_fp8_product_done_by_hand():
    from torchtune_mistral3.peft import fp8_linear
    from torchtune_mistral3.peft._fp8_lora import quantize_activation

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 64, generator=g, requires_grad=True)
    w, s = quantize_per_tensor(torch.randn(48, 64, generator=g))
    out = fp8_linear(x, w, s, matmul="scaled_mm")
    xq, xs = quantize_activation(x.detach().reshape(-1, 64))
    by_hand = ((xq.float() * xs) @ (w.float() * s.float()).T).reshape(2, 5, 48)
    torch.testing.assert_close(out, by_hand, rtol=1e-5, atol=1e-5)
    # close to the dequantising path (the input is rounded to FP8 too), and the same input gradient
    exact = fp8_linear(x, w, s)
    assert ((out - exact).abs().max() / exact.abs().max()).item() < 0.1
    (gs,) = torch.autograd.grad(out.sum(), x)
    (ge,) = torch.autograd.grad(exact.sum(), x)
    torch.testing.assert_close(gs, ge, rtol=0, atol=0)
    with pytest.raises(ValueError, match="fp8_matmul='fp4'"):
        fp8_linear(x, w, s, matmul="fp4")
