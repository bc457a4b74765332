"""KV-cache generation of the plugin's model: equal to full recomputation and to transformers' greedy generate."""

import pytest
import torch
from _hf_reference import IMG, PAD, image_token_block, plugin_from_hf, tiny_hf_config, tiny_hf_model
from torchtune_mistral3.generation import collate_prompts, generate

EOS = 2
NEW_TOKENS = 12
# Two prompts of different lengths, each with an image of its own size (sample 1 is left-padded).
PROMPT_IMAGES = ((56, 84), (84, 56))
PROMPT_TEXT = ((5, 3), (1, 2))


def _prompts(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(20, 256, (n,), generator=g).tolist()

    samples = []
    for (h, w), (before, after) in zip(PROMPT_IMAGES, PROMPT_TEXT):
        tokens = [1] + text(before) + image_token_block(h, w) + text(after)
        samples.append({"tokens": tokens, "encoder_input": {"image": {"images": [torch.randn(3, h, w, generator=g)]}}})
    return collate_prompts(samples, pad_id=PAD)


@pytest.fixture(scope="module")
def pair():
    hf = tiny_hf_model(tiny_hf_config())
    return hf, plugin_from_hf(hf)


def _plugin(model, batch, **kwargs):
    out = generate(
        model,
        batch["tokens"],
        encoder_input=batch["encoder_input"],
        max_generated_tokens=NEW_TOKENS,
        pad_id=PAD,
        top_k=1,
        stop_tokens=[EOS],
        **kwargs,
    )
    return out[:, batch["tokens"].shape[1] :]


def test_prompts_have_different_lengths():
    tokens = _prompts()["tokens"]
    assert (tokens[1] == PAD).sum() > 0 and (tokens[0] == PAD).sum() == 0
    assert (tokens == IMG).sum(1).tolist() == [6, 6]


def test_kv_cache_gives_the_tokens_of_full_recomputation(pair):
    _, model = pair
    batch = _prompts()
    cached = _plugin(model, batch, use_kv_cache=True)
    full = _plugin(model, batch, use_kv_cache=False)
    assert cached.shape == (2, NEW_TOKENS)
    assert torch.equal(cached, full)
    assert not model.caches_are_setup()  # the call's caches are gone again


def test_vision_tower_runs_once_per_batch_of_images(pair):
    _, model = pair
    calls = []
    handle = model.encoders["image"].vision.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    try:
        _plugin(model, _prompts(), use_kv_cache=False)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_greedy_tokens_equal_transformers_generate(pair):
    hf, model = pair
    batch = _prompts()
    ours = _plugin(model, batch)
    image = batch["encoder_input"]["image"]
    with torch.no_grad():
        theirs = hf.generate(
            input_ids=batch["tokens"],
            attention_mask=(batch["tokens"] != PAD).long(),
            pixel_values=image["pixel_values"],
            image_sizes=image["image_sizes"],
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )[:, batch["tokens"].shape[1] :]
    for i in range(2):
        n = theirs.shape[1]
        if EOS in theirs[i].tolist():
            n = theirs[i].tolist().index(EOS) + 1
        assert ours[i, :n].tolist() == theirs[i, :n].tolist(), i
    assert theirs.shape[1] == NEW_TOKENS  # at least one sample ran the full length


def test_setup_caches_takes_the_stock_recipes_arguments(pair):
    _, model = pair
    model.setup_caches(batch_size=1, dtype=torch.float32, encoder_max_seq_len=16, decoder_max_seq_len=40)
    try:
        assert model.caches_are_setup() and model.caches_are_enabled()
        assert model.decoder_max_cache_seq_len == 40
        assert model.decoder.layers[0].attn.kv_cache.k_cache.shape[2] == 40
        model.reset_caches()
        assert int(model.decoder.layers[0].attn.kv_cache.size) == 0
    finally:
        from torchtune.modules.common_utils import delete_kv_caches

        delete_kv_caches(model)


def test_caches_set_up_by_the_caller_are_reset_and_reused(pair):
    from torchtune.modules.common_utils import delete_kv_caches

    _, model = pair
    batch = _prompts()
    fresh = _plugin(model, batch)
    model.setup_caches(batch_size=2, dtype=torch.float32, decoder_max_seq_len=batch["tokens"].shape[1] + NEW_TOKENS)
    try:
        k_cache = model.decoder.layers[0].attn.kv_cache.k_cache
        first = _plugin(model, batch)
        again = _plugin(model, batch)  # the first call's entries are gone (reset), not attended to
        assert model.decoder.layers[0].attn.kv_cache.k_cache is k_cache  # the same buffers, kept for the caller
        assert torch.equal(first, fresh) and torch.equal(again, fresh)
        with pytest.raises(ValueError, match="set up for batch 2 and .* needs batch 1"):
            _plugin(model, {"tokens": batch["tokens"][:1], "encoder_input": None})
    finally:
        delete_kv_caches(model)
