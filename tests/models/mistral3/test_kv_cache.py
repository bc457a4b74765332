"""KV-cache generation of the plugin's model: equal to full recomputation and to transformers' greedy generate;
its decode step compiles to one graph (dynamo + AOTAutograd through ``aot_eager``) that gives the same tokens."""

import pytest
import torch
from _hf_reference import IMG, PAD, image_token_block, plugin_from_hf, tiny_hf_config, tiny_hf_model
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torchtune import generation
from torchtune.modules.common_utils import delete_kv_caches, local_kv_cache
from torchtune_mistral3.generation import collate_prompts, decode_one_token, generate

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
        stop_tokens=[EOS],
        **{"top_k": 1, **kwargs},
    )
    return out[:, batch["tokens"].shape[1] :]


def test_prompts_have_different_lengths():
    tokens = _prompts()["tokens"]
    assert (tokens[1] == PAD).sum() > 0 and (tokens[0] == PAD).sum() == 0
    assert (tokens == IMG).sum(1).tolist() == [6, 6]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_kv_cache_gives_the_tokens_of_full_recomputation(pair, sampled):
    _, model = pair
    batch = _prompts()

    def options():  # the same noise for both runs: one generator seeded alike
        if not sampled:
            return {}
        return {"top_k": None, "temperature": 0.7, "rng": torch.Generator().manual_seed(3)}

    cached = _plugin(model, batch, use_kv_cache=True, **options())
    full = _plugin(model, batch, use_kv_cache=False, **options())
    assert cached.shape == (2, NEW_TOKENS)
    assert torch.equal(cached, full)
    assert not model.caches_are_setup()  # the call's caches are gone again


def test_cached_decode_step_logits_equal_full_recomputation(pair):
    """The model's forward on one new token per sample from the KV cache (grouped KV heads read in place, the
    left padding masked) against the whole left-padded sequence run without a cache (SDPA's own GQA)."""
    _, model = pair
    batch = _prompts()
    prompt = batch["tokens"]
    b, s = prompt.shape
    new = torch.randint(20, 256, (b, 1), generator=torch.Generator().manual_seed(1))
    valid = F.pad(prompt != PAD, (0, 1), value=True)
    positions = generation.get_position_ids_from_padding_mask(valid)
    mask = generation.get_causal_mask_from_padding_mask(valid)  # [b, s + 1, s + 1]
    image = batch["encoder_input"]
    with torch.no_grad():
        full = model(torch.cat([prompt, new], dim=1), encoder_input=image, mask=mask, input_pos=positions)[:, -1]
        with local_kv_cache(
            model, batch_size=b, device=torch.device("cpu"), dtype=torch.float32, decoder_max_seq_len=s + 1
        ):
            model(prompt, encoder_input=image, mask=mask[:, :s], input_pos=positions[:, :s])
            step = model(new, mask=mask[:, s:], input_pos=positions[:, s:])[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


class _HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (``.item()``, ``bool()``: a device sync each on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_eager_decode_step_reads_nothing_back_to_the_host(pair):
    _, model = pair
    batch = _prompts()
    prompt = batch["tokens"]
    b, s = prompt.shape
    valid = prompt != PAD
    positions = generation.get_position_ids_from_padding_mask(F.pad(valid, (0, 1), value=True))
    step_mask = F.pad(valid, (0, 1), value=True)[:, None]
    with (
        torch.no_grad(),
        local_kv_cache(model, batch_size=b, device=torch.device("cpu"), dtype=torch.float32, decoder_max_seq_len=s + 1),
    ):
        model(
            prompt,
            encoder_input=batch["encoder_input"],
            input_pos=positions[:, :s],
            mask=generation.get_causal_mask_from_padding_mask(valid, target_seq_len=s + 1),
        )
        with _HostReads() as reads:
            decode_one_token(model, prompt[:, -1:], positions[:, s:], step_mask, top_k=1)
    assert reads.count == 0


def test_writing_past_the_end_of_the_cache_fails(pair):
    _, model = pair
    model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=3)
    try:
        cache = model.decoder.layers[0].attn.kv_cache
        kv = torch.zeros(1, cache.k_cache.shape[1], 3, cache.k_cache.shape[3])
        cache.update(kv, kv)  # fills it
        with pytest.raises(IndexError, match="out of bounds"):
            cache.update(kv[:, :, :1], kv[:, :, :1])
    finally:
        delete_kv_caches(model)


def test_only_the_last_position_reaches_the_head(pair):
    _, model = pair
    shapes = []
    handle = model.decoder.norm.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    try:
        _plugin(model, _prompts())
    finally:
        handle.remove()
    assert shapes == [(2, 1, 64)] * NEW_TOKENS  # prefill and every step: one position per sample


def test_compiled_decode_step_is_one_graph_with_the_eager_tokens(pair):
    _, model = pair
    batch = _prompts()
    eager = _plugin(model, batch)
    # the same prompts with one more column of left padding: a longer prompt, the same tokens
    longer = {**batch, "tokens": torch.cat([torch.full((2, 1), PAD), batch["tokens"]], dim=1)}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = torch.compile(decode_one_token, backend="aot_eager", fullgraph=True, dynamic=False)
    # one cache for both calls (as a recipe keeps it): the step's shapes depend on the cache only
    model.setup_caches(batch_size=2, dtype=torch.float32, decoder_max_seq_len=longer["tokens"].shape[1] + NEW_TOKENS)
    try:
        compiled = [_plugin(model, b, decode_step=step) for b in (batch, longer)]
    finally:
        delete_kv_caches(model)
        torch._dynamo.reset()
    assert torch.equal(compiled[0], eager) and torch.equal(compiled[1], eager)
    # 2 x (NEW_TOKENS - 1) decode steps, one graph: no recompile across steps or prompt lengths
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


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
        delete_kv_caches(model)


def test_caches_set_up_by_the_caller_are_reset_and_reused(pair):
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
