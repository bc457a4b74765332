"""Packed sequences through the model: block-causal attention, per-sample positions, images per sample (fp32).

References: the same samples unpacked (padded batch, same loss normalisation) for the loss and every gradient,
and transformers' forward on each sample alone for the logits.
"""

from typing import List, Tuple

import pytest
import torch
from _hf_reference import PAD, image_token_block, plugin_from_hf, tiny_hf_config, tiny_hf_model
from torchtune_mistral3.data import padded_collate_mistral3, padded_collate_packed_mistral3
from torchtune_mistral3.models.mistral3 import block_causal_mask

RTOL = 1e-6
L0 = 16  # YaRN / Llama-4 original length of the tiny config
# (text before, image sizes (h, w) px, text after) per sample; sample 2 is a later sample whose positions pass L0
SAMPLES: List[Tuple[int, Tuple[Tuple[int, int], ...], int]] = [
    (3, ((56, 84),), 6),
    (2, (), 9),
    (4, ((84, 56), (28, 56)), 18),
    (5, ((56, 56),), 12),
]
PACKS = [[0, 1, 2], [3]]
PACK_LEN = 72


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _samples(vocab_size: int, seed: int = 0):
    """Transformed samples (tokens, labels, images) as the dataset gives them; labels on the last half."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for before, sizes, after in SAMPLES:
        tokens = [1] + torch.randint(20, vocab_size, (before,), generator=g).tolist()
        images = []
        for h, w in sizes:
            tokens += image_token_block(h, w) + torch.randint(20, vocab_size, (2,), generator=g).tolist()
            images.append(torch.randn(3, h, w, generator=g))
        tokens += torch.randint(20, vocab_size, (after,), generator=g).tolist()
        answer = len(tokens) - after // 2
        labels = [-100] * answer + tokens[answer:]
        out.append({"tokens": tokens, "labels": labels, "encoder_input": {"image": {"images": images}}})
    return out


def _pack(samples, rows):
    """One pack laid out as :class:`~torchtune_mistral3.datasets.PackedDataset` does."""
    pack = {"tokens": [], "labels": [], "input_pos": [], "seq_lens": []}
    images = []
    for r in rows:
        n = len(samples[r]["tokens"])
        pack["tokens"] += samples[r]["tokens"]
        pack["labels"] += [-100] + samples[r]["labels"][1:]
        pack["input_pos"] += list(range(n))
        pack["seq_lens"].append(n)
        images += samples[r]["encoder_input"]["image"]["images"]
    pad = PACK_LEN - len(pack["tokens"])
    pack["tokens"] += [PAD] * pad
    pack["labels"] += [-100] * pad
    pack["input_pos"] += list(range(pad))
    pack["seq_lens"].append(pad)
    pack["encoder_input"] = {"image": {"images": images}}
    return pack


def _loss_and_grads(model, batch, labels, num_tokens):
    """Summed next-token cross-entropy / ``num_tokens`` (the recipe's normalisation) and every gradient."""
    model.zero_grad()
    logits = model(**batch)
    shifted = torch.hstack((labels[:, 1:], torch.full_like(labels[:, :1], -100)))
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), shifted.flatten(), ignore_index=-100, reduction="sum"
    ) / num_tokens
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads


@pytest.fixture(scope="module")
def setup():
    hf = tiny_hf_model(tiny_hf_config(original_max_position_embeddings=L0))
    model = plugin_from_hf(hf, vision_trainable=True)
    samples = _samples(hf.config.text_config.vocab_size)
    return hf, model, samples


def _packed_batch(samples):
    batch = padded_collate_packed_mistral3([_pack(samples, rows) for rows in PACKS], padding_idx=PAD)
    batch["mask"] = block_causal_mask(batch.pop("document_ids"))
    return batch


def test_the_packs_exercise_what_they_should(setup):
    _, _, samples = setup
    batch = _packed_batch(samples)
    lengths = [len(s["tokens"]) for s in samples]
    assert all(sum(lengths[r] for r in rows) < PACK_LEN for rows in PACKS)
    assert lengths[2] > L0 and sum(lengths[:2]) > 0  # a later sample of pack 0 runs past YaRN's L0
    sizes = {tuple(s.shape[1:]) for s in batch["encoder_input"]["image"]["pixel_values"]}
    assert len({tuple(x) for x in batch["encoder_input"]["image"]["image_sizes"].tolist()}) == 4 and sizes
    assert batch["input_pos"][0].max() < lengths[2] and batch["mask"].dtype == torch.bool


def test_packed_loss_and_gradients_equal_unpacked(setup):
    _, model, samples = setup
    model.train()
    order = [r for rows in PACKS for r in rows]
    plain = padded_collate_mistral3([samples[r] for r in order], padding_idx=PAD)
    packed = _packed_batch(samples)
    # the same answer tokens are counted either way (the first label of a sample is never a target)
    num_tokens = (plain["labels"][:, 1:] != -100).sum()
    assert num_tokens == (packed["labels"][:, 1:] != -100).sum()
    _, loss_plain, grads_plain = _loss_and_grads(model, plain, plain.pop("labels"), num_tokens)
    _, loss_packed, grads_packed = _loss_and_grads(model, packed, packed.pop("labels"), num_tokens)
    model.eval()
    assert _rel(loss_packed, loss_plain) < RTOL
    assert grads_plain.keys() == grads_packed.keys() and len(grads_plain) == len(list(model.parameters()))
    worst = max(grads_plain, key=lambda n: _rel(grads_packed[n], grads_plain[n]))
    assert _rel(grads_packed[worst], grads_plain[worst]) < RTOL, worst


def test_each_packed_sample_equals_transformers_alone(setup):
    hf, model, samples = setup
    packed = _packed_batch(samples)
    packed.pop("labels")
    with torch.no_grad():
        logits = model(**packed)
        for p, rows in enumerate(PACKS):
            start = 0
            for r in rows:
                n = len(samples[r]["tokens"])
                images = samples[r]["encoder_input"]["image"]["images"]
                single = padded_collate_mistral3([samples[r]], padding_idx=PAD)["encoder_input"]["image"]
                expected = hf(
                    input_ids=torch.tensor([samples[r]["tokens"]]),
                    pixel_values=single["pixel_values"] if images else None,
                    image_sizes=single["image_sizes"] if images else None,
                ).logits[0]
                assert _rel(logits[p, start : start + n], expected) < 1e-5, (p, r)
                start += n


def test_flex_block_mask_path_equals_the_dense_mask_path(setup, monkeypatch):
    # What CUDA runs (FlexAttention BlockMask, shared KV heads), forward only on the CPU (torch's CPU flex has no
    # backward; eager flex stands in for the compiled kernel), against the dense boolean mask of the CPU path.
    from torchtune_mistral3.models.mistral3 import _attention

    monkeypatch.setattr(_attention, "_compiled_flex_attention", _attention.flex_attention)
    _, model, samples = setup
    dense = _packed_batch(samples)
    dense.pop("labels")
    flex = dict(dense, mask=_attention.flex_block_causal_mask(
        padded_collate_packed_mistral3([_pack(samples, rows) for rows in PACKS])["document_ids"]))
    assert isinstance(flex["mask"], _attention.BlockMask)
    with torch.no_grad():
        assert _rel(model(**flex), model(**dense)) < 1e-6


def test_packed_kernel_choice_follows_the_recorded_h200_attention_runs():
    # Each recorded run of `bench/packing.py --attention-only` timed one layer's block-causal attention forward +
    # backward over the same packs with FlexAttention and with SDPA + the dense mask, at TP 1 and TP 8 head shapes
    # and 1-6 packs per micro-batch: the choice must name the faster kernel of every run, and both kinds must occur.
    import json
    from pathlib import Path

    from torchtune_mistral3.models.mistral3 import packed_attention_prefers_flex

    results = Path(__file__).parents[3] / "bench" / "results"
    seen = set()
    runs = sorted(results.glob("packing_attention_tp*_pb*_h200.json"))
    assert len(runs) >= 6
    for path in runs:
        run = json.loads(path.read_text())
        batch, seq = run["layouts"]["packed"]["shape"]
        kv_heads = 8 // run["attention_tp"]  # the model's 8 KV heads, split over the TP ranks
        flex_s = run["attention"]["packed_flex_blockmask"]["s"]
        dense_s = run["attention"]["packed_sdpa_dense_mask"]["s"]
        choice = packed_attention_prefers_flex(batch, kv_heads, seq)
        assert choice == (flex_s < dense_s), (path.name, flex_s, dense_s)
        seen.add(choice)
    assert seen == {True, False}


def test_block_causal_mask_is_dense_when_flex_is_declined():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    mask = block_causal_mask(ids, flex=False)
    expect = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                           [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask[0], expect)
