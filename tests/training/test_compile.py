"""No recompile after warm-up: the demo model compiled as the recipe compiles it, over varied MedPix-like batches.

The tiny demo model (``write_demo_checkpoint``: same code paths as Mistral Medium 3.5, vision tower frozen as in the
demo config) is compiled per block with :func:`compile_blocks` and its chunked cross-entropy with
:func:`compile_loss` (backend ``aot_eager``, CPU), then trained on batches made by the real model transform and
collates: padded batches of 2 samples and packs of ``max_seq_len`` tokens, samples with 0 to 3 images of sizes
from 28 to 224 px in every aspect ratio (so every batch has another patch count, image count and padded length).
Warm-up is the first padded step, the first packed step and one forward under ``no_grad`` (validation); after it,
dynamo must compile nothing more (``counters["stats"]["unique_graphs"]`` and ``counters["frames"]["ok"]`` stay
put; the guard failures that would have caused a recompile are printed if not).
"""

import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters, guard_failures
from torchtune.data import Message
from torchtune.modules.loss import CEWithChunkedOutputLoss
from torchtune_mistral3.checkpointing import mistral3_from_hf_config, write_demo_checkpoint
from torchtune_mistral3.data import padded_collate_mistral3, padded_collate_packed_mistral3
from torchtune_mistral3.datasets._packed import PackedDataset
from torchtune_mistral3.models.mistral3 import block_causal_mask, mistral3_transform
from torchtune_mistral3.training import compile_blocks, compile_loss

MAX_SEQ_LEN = 320
MAX_IMAGE_SIZE = 224
STEPS_AFTER_WARM_UP = 6  # of each kind, padded and packed


def _image(rng: random.Random) -> Image.Image:
    w, h = rng.randint(28, MAX_IMAGE_SIZE), rng.randint(28, MAX_IMAGE_SIZE)
    pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(w * h))
    return Image.frombytes("RGB", (w, h), pixels.numpy().tobytes())


def _samples(transform, rng: random.Random, n: int):
    """``n`` transformed samples with 0-3 images each (the first with one) and answers of 1-40 words."""
    out = []
    for i in range(n):
        images = [_image(rng) for _ in range(1 if i == 0 else rng.randint(0, 3))]
        content = [{"type": "image", "content": im} for im in images] + [{"type": "text", "content": "Findings?"}]
        answer = " ".join(["lesion"] * rng.randint(1, 40))
        s = transform({"messages": [Message("user", content, masked=True), Message("assistant", answer)]})
        s["labels"] = [-100 if m else t for t, m in zip(s["tokens"], s["mask"])]
        out.append(s)
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo_checkpoint")
    write_demo_checkpoint(str(directory))
    torch.manual_seed(0)
    model = mistral3_from_hf_config(str(directory), vision_trainable=False)
    transform = mistral3_transform(str(Path(directory) / "tekken.json"), max_seq_len=MAX_SEQ_LEN,
                                   max_image_size=MAX_IMAGE_SIZE)
    return model, transform


def _step(model, loss_fn, batch, train: bool = True) -> None:
    batch = dict(batch)
    if "document_ids" in batch:
        batch["mask"] = block_causal_mask(batch.pop("document_ids"))
    labels = batch.pop("labels")
    labels = torch.hstack((labels[:, 1:], torch.full_like(labels[:, :1], -100)))
    with torch.set_grad_enabled(train):
        loss = loss_fn(model(**batch), labels)
        if train:
            loss.backward()


def _compiled() -> tuple:
    return counters["stats"]["unique_graphs"], counters["frames"]["ok"]


def test_no_recompile_after_warm_up(demo, monkeypatch):
    model, transform = demo
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    guard_failures.clear()
    loss_fn = CEWithChunkedOutputLoss()
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    loss_fn = compile_loss(loss_fn, static_shapes=False, verbose=False)
    compile_blocks(model, static_decoder_shapes=False, verbose=False)

    rng = random.Random(0)
    padded = [padded_collate_mistral3(_samples(transform, rng, 2), pad_to_multiple_of=8)  # as the recipe's collate
              for _ in range(STEPS_AFTER_WARM_UP + 1)]
    unpacked = _samples(transform, rng, 8 * (STEPS_AFTER_WARM_UP + 1))
    packs = PackedDataset(unpacked, [len(s["tokens"]) for s in unpacked], max_seq_len=MAX_SEQ_LEN)
    packed = [padded_collate_packed_mistral3([packs[i]]) for i in range(min(len(packs), STEPS_AFTER_WARM_UP + 1))]
    assert len(packed) == STEPS_AFTER_WARM_UP + 1
    # the batches do vary: padded lengths, patch counts and image counts
    assert len({b["tokens"].shape[1] for b in padded}) >= 4
    patches = {int(b["encoder_input"]["image"]["image_sizes"].prod(1).sum()) for b in padded + packed}
    assert len(patches) >= 2 * STEPS_AFTER_WARM_UP
    assert len({int(b["encoder_input"]["image"]["images_per_sample"].sum()) for b in padded + packed}) >= 3

    _step(model, loss_fn, padded[0])  # warm-up
    _step(model, loss_fn, packed[0])
    _step(model, loss_fn, padded[1], train=False)
    warm = _compiled()
    assert warm[0] > 0, "nothing was compiled"
    seen = {code: len(reasons) for code, reasons in guard_failures.items()}
    for p, q in zip(padded[1:], packed[1:]):
        _step(model, loss_fn, p)
        _step(model, loss_fn, q)
    reasons = [r for code, v in guard_failures.items() for r in v[seen.get(code, 0):]]
    assert _compiled() == warm, f"recompiled after warm-up ({_compiled()} vs {warm} graphs, frames): {reasons}"


@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_loss_takes_every_length_in_one_graph(monkeypatch, batch):
    # lengths as the recipe's collate gives them under compile (multiples of the 8 loss chunks); torchtune's
    # compile_loss (dynamo's default shapes) compiles a second graph at the second length
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    vocab = 24  # no chunk has 24 rows: dynamo's duck sizing would tie the two sizes
    loss_fn = compile_loss(CEWithChunkedOutputLoss(), static_shapes=False, verbose=False)
    g = torch.Generator().manual_seed(0)
    for i, s in enumerate([64, 48, 200, 16, 104, 352]):
        logits = torch.randn(batch, s, vocab, generator=g)
        labels = torch.randint(0, vocab, (batch, s), generator=g)
        labels[:, :3] = -100
        chunks = [c.contiguous() for c in logits.chunk(8, dim=1)]  # the model's output chunks are tensors of their own
        got = loss_fn(chunks, labels)
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(got, want)
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs == 1
