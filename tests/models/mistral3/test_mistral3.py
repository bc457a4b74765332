"""The plugin's Mistral 3 VLM against transformers' Mistral3ForConditionalGeneration on tiny random models (fp32)."""

import pytest
import torch
from _hf_reference import IMG, PAD, plugin_from_hf, tiny_batch, tiny_hf_config, tiny_hf_model
from torchtune import training
from torchtune.modules import MultiHeadAttention, TransformerSelfAttentionLayer
from torchtune_mistral3.checkpointing import mistral3_from_hf_config
from torchtune_mistral3.models.mistral3 import hf_key_to_tune

# Two configurations: head_dim != hidden/heads with attention factor 1.416 (mscale_all_dim 0), and
# head_dim == hidden/heads with attention factor 1 (mscale_all_dim 1). Both have YaRN factor 64, L0 = 16 < 40
# tokens and a non-zero Llama-4 beta.
CONFIGS = {
    "head_dim24_mscale_all_dim0": dict(head_dim=24, mscale_all_dim=0.0),
    "head_dim16_mscale_all_dim1_bias": dict(head_dim=16, mscale_all_dim=1.0, projector_bias=True),
}
LOGITS_RTOL = 1e-5
GRAD_RTOL = 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _hf_forward(hf, batch):
    image = batch["encoder_input"]["image"]
    return hf(input_ids=batch["tokens"], pixel_values=image["pixel_values"], image_sizes=image["image_sizes"]).logits


def _loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    labels = tokens[:, 1:].masked_fill(tokens[:, 1:] == PAD, -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)


def _plugin_params_by_key(model):
    """Parameters under their state-dict keys (the fusion model stores tok_embeddings under decoder.)."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.nn.Parameter)}


@pytest.fixture(params=list(CONFIGS), scope="module")
def pair(request):
    hf = tiny_hf_model(tiny_hf_config(**CONFIGS[request.param]))
    return hf, plugin_from_hf(hf, vision_trainable=True)


class TestMistral3Parity:
    def test_logits_match_transformers(self, pair):
        hf, model = pair
        batch = tiny_batch()
        assert batch["tokens"].shape[1] > hf.config.text_config.rope_parameters["original_max_position_embeddings"]
        with torch.no_grad():
            expected = _hf_forward(hf, batch)
            actual = model(batch["tokens"], encoder_input=batch["encoder_input"])
        assert actual.dtype == torch.float32 and actual.shape == expected.shape
        assert _rel(actual, expected) < LOGITS_RTOL

    def test_gradients_match_transformers(self, pair):
        hf, model = pair
        batch = tiny_batch()
        hf.zero_grad()
        model.zero_grad()
        _loss(_hf_forward(hf, batch), batch["tokens"]).backward()
        _loss(model(batch["tokens"], encoder_input=batch["encoder_input"]), batch["tokens"]).backward()
        params = _plugin_params_by_key(model)
        compared = 0
        for name, p in hf.named_parameters():
            mine = params[hf_key_to_tune(name)]
            assert mine.grad is not None, name
            assert _rel(mine.grad, p.grad) < GRAD_RTOL, name
            compared += 1
        assert compared == len(params)

    def test_text_only_sample_matches(self, pair):
        hf, model = pair
        tokens = tiny_batch()["tokens"][1:]
        with torch.no_grad():
            assert _rel(model(tokens), hf(input_ids=tokens).logits) < LOGITS_RTOL

    def test_batch_without_images_runs_the_vision_layers(self, pair):
        hf, model = pair
        tokens = tiny_batch()["tokens"][1:]
        empty = {
            "pixel_values": torch.zeros(0, 3, 28, 28),
            "image_sizes": torch.zeros(0, 2, dtype=torch.long),
            "images_per_sample": torch.tensor([0]),
        }
        calls = []
        handles = [
            layer.register_forward_hook(lambda m, i, o: calls.append(o.shape))
            for layer in model.encoders["image"].vision.layers
        ]
        try:
            with torch.no_grad():
                actual = model(tokens, encoder_input={"image": empty})
        finally:
            for h in handles:
                h.remove()
        assert len(calls) == len(model.encoders["image"].vision.layers)
        assert all(shape[1] == 0 for shape in calls)
        with torch.no_grad():
            assert _rel(actual, hf(input_ids=tokens).logits) < LOGITS_RTOL

    def test_chunked_output_equals_full_logits(self, pair):
        _, model = pair
        batch = tiny_batch()
        with torch.no_grad():
            full = model(batch["tokens"], encoder_input=batch["encoder_input"])
            model.set_num_output_chunks(4)
            try:
                chunks = model(batch["tokens"], encoder_input=batch["encoder_input"])
            finally:
                model.set_num_output_chunks(0)
        assert isinstance(chunks, list) and len(chunks) == 4
        torch.testing.assert_close(torch.cat(chunks, dim=1).float(), full, rtol=0, atol=0)


def test_padding_row_gets_no_gradient():
    hf = tiny_hf_model()
    model = plugin_from_hf(hf)
    batch = tiny_batch()
    assert (batch["tokens"] == PAD).any()
    _loss(model(batch["tokens"], encoder_input=batch["encoder_input"]), batch["tokens"]).backward()
    grad = model.tok_embeddings.weight.grad
    assert model.tok_embeddings.padding_idx == PAD
    assert torch.count_nonzero(grad[PAD]) == 0
    assert torch.count_nonzero(grad[IMG]) == 0  # replaced by image features, as in transformers
    assert torch.count_nonzero(grad[batch["tokens"][1, 1]]) > 0


def test_meta_init_then_rope_init_equals_eager_init():
    hf = tiny_hf_model()
    eager = plugin_from_hf(hf)
    # Build on meta exactly as the recipe does, then materialise, rebuild RoPE tables and load weights.
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        hf.config.save_pretrained(tmp)
        with training.set_default_dtype(torch.float32), torch.device("meta"):
            meta = mistral3_from_hf_config(tmp)
    meta.to_empty(device="cpu")
    for m in meta.modules():
        if hasattr(m, "rope_init"):
            m.rope_init()
    meta.load_state_dict(eager.state_dict(), strict=True)
    meta.eval()
    buffers = dict(eager.named_buffers())
    for name, buf in meta.named_buffers():
        torch.testing.assert_close(buf, buffers[name], rtol=0, atol=0, msg=name)
    batch = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            meta(batch["tokens"], encoder_input=batch["encoder_input"]),
            eager(batch["tokens"], encoder_input=batch["encoder_input"]),
            rtol=0,
            atol=0,
        )


def test_rope_buffers_stay_out_of_the_state_dict():
    model = plugin_from_hf(tiny_hf_model())
    assert set(model.state_dict()) == set(_plugin_params_by_key(model))
    assert {n.rsplit(".", 1)[-1] for n, _ in model.named_buffers()} == {"cos", "sin", "scale"}


@pytest.mark.parametrize("sample", [0, 1])
def test_image_token_mismatch_names_the_sample(sample):
    model = plugin_from_hf(tiny_hf_model())
    batch = tiny_batch()
    tokens = batch["tokens"].clone()
    if sample == 0:
        tokens[0, (tokens[0] == IMG).nonzero()[0, 0]] = 42  # one [IMG] too few
    else:
        tokens[1, 3] = IMG  # an [IMG] in the sample that has no image
    with pytest.raises(ValueError, match=f"sample {sample} of the batch"):
        model(tokens, encoder_input=batch["encoder_input"])


def test_image_tokens_without_images_fail():
    model = plugin_from_hf(tiny_hf_model())
    with pytest.raises(ValueError, match="no encoder_input"):
        model(tiny_batch()["tokens"])


def test_bf16_stays_within_bf16_tolerance_of_fp32():
    hf = tiny_hf_model()
    model = plugin_from_hf(hf)
    batch = tiny_batch()
    with torch.no_grad():
        fp32 = model(batch["tokens"], encoder_input=batch["encoder_input"])
        model.to(torch.bfloat16)
        bf16 = model(batch["tokens"], encoder_input=batch["encoder_input"])
    assert bf16.dtype == torch.float32  # unembed upcasts
    assert _rel(bf16, fp32) < 5e-2
    assert (bf16.argmax(-1) == fp32.argmax(-1)).float().mean() > 0.9


def test_torchtune_machinery_sees_stock_modules():
    model = plugin_from_hf(tiny_hf_model())
    attns = [m for m in model.decoder.modules() if isinstance(m, MultiHeadAttention)]
    assert len(attns) == len(model.decoder.layers) == 2
    assert all(isinstance(layer, TransformerSelfAttentionLayer) for layer in model.decoder.layers)
    assert all(isinstance(layer, TransformerSelfAttentionLayer) for layer in model.encoders["image"].vision.layers)
    names = {n for n, m in model.named_modules() if training.get_shard_conditions(n, m)}
    assert {"decoder.layers.0", "decoder.layers.1", "encoders.image.vision.layers.0"} <= names


def test_trainable_defaults_and_switches():
    hf = tiny_hf_model()

    def trainable(model):
        groups = {"vision": set(), "projector": set(), "embed": set(), "output": set(), "body": set()}
        for name, p in model.named_parameters():
            group = (
                "vision"
                if name.startswith("encoders.image.vision.")
                else "projector"
                if name.startswith("encoders.image.projector.")
                else "embed"
                if name.startswith("tok_embeddings.")
                else "output"
                if name.startswith("decoder.output.")
                else "body"
            )
            groups[group].add(p.requires_grad)
        return {k: v.pop() for k, v in groups.items() if len(v) == 1}

    assert trainable(plugin_from_hf(hf)) == dict(vision=False, projector=True, embed=True, output=True, body=True)
    flipped = plugin_from_hf(
        hf,
        vision_trainable=True,
        projector_trainable=False,
        embeddings_trainable=False,
        output_trainable=False,
        decoder_trainable=False,
    )
    assert trainable(flipped) == dict(vision=True, projector=False, embed=False, output=False, body=False)
    only_head = plugin_from_hf(hf, embeddings_trainable=False, decoder_trainable=False, projector_trainable=False)
    assert trainable(only_head) == dict(vision=False, projector=False, embed=False, output=True, body=False)


def test_explicit_causal_mask_agrees_with_the_implicit_one():
    model = plugin_from_hf(tiny_hf_model())
    batch = tiny_batch()
    b, s = batch["tokens"].shape
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool)).expand(b, s, s)
    with torch.no_grad():
        default = model(batch["tokens"], encoder_input=batch["encoder_input"])
        masked = model(batch["tokens"], encoder_input=batch["encoder_input"], mask=causal)
    assert _rel(masked, default) < LOGITS_RTOL
