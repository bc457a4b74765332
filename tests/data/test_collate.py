"""padded_collate_mistral3: shapes, padding, and image batching equal to transformers' Pixtral processor."""

from pathlib import Path

import mistral_common
import numpy as np
import pytest
import torch
from PIL import Image
from torchtune.data import Message
from torchtune_mistral3.data import padded_collate_mistral3
from torchtune_mistral3.models.mistral3._transform import mistral3_transform
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

# The v3 tekken file mistral-common ships; the transform's 28 px geometry overrides its Pixtral-12B image section.
TEKKEN = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
RNG = np.random.default_rng(0)


def _rgb(w, h):
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def transform():
    return mistral3_transform(str(TEKKEN), max_seq_len=None)


def _sample(transform, images, answer):
    content = [{"type": "image", "content": im} for im in images] + [{"type": "text", "content": "Findings?"}]
    out = transform({"messages": [Message("user", content, masked=True), Message("assistant", answer)]})
    out["labels"] = [-100 if m else t for t, m in zip(out["tokens"], out["mask"])]
    return out


def test_batch_with_0_1_2_images_per_sample(transform):
    images = [[], [_rgb(100, 150)], [_rgb(300, 60), _rgb(56, 56)]]
    answers = ["No image here, a longer answer than the others.", "One.", "Two images."]
    batch = [_sample(transform, ims, a) for ims, a in zip(images, answers)]
    out = padded_collate_mistral3(batch, padding_idx=11, ignore_idx=-100)
    seq = max(len(s["tokens"]) for s in batch)
    assert out["tokens"].shape == out["labels"].shape == (3, seq)
    assert out["tokens"].dtype == out["labels"].dtype == torch.long
    for i, s in enumerate(batch):
        n = len(s["tokens"])
        assert out["tokens"][i, :n].tolist() == s["tokens"] and (out["tokens"][i, n:] == 11).all()
        assert out["labels"][i, :n].tolist() == s["labels"] and (out["labels"][i, n:] == -100).all()
    enc = out["encoder_input"]["image"]
    assert enc["images_per_sample"].tolist() == [0, 1, 2]
    # Reference: transformers' processor pads the same images (in batch order) to the largest h and w.
    flat = [im for ims in images for im in ims]
    proc = PixtralImageProcessorPil(size={"longest_edge": 1540}, patch_size={"height": 28, "width": 28})
    ref = proc(images=flat, return_tensors="pt")
    torch.testing.assert_close(enc["pixel_values"], ref["pixel_values"], rtol=0, atol=0)
    assert enc["image_sizes"].tolist() == ref["image_sizes"].tolist()
    assert enc["image_sizes"].dtype == torch.long and enc["pixel_values"].dtype == torch.float32
    # image tokens in each row match that row's images
    sizes = enc["image_sizes"].split(enc["images_per_sample"].tolist())
    for i, per_sample in enumerate(sizes):
        expected = int(sum(h * w for h, w in per_sample.tolist()) // 28**2)
        assert int((out["tokens"][i] == 10).sum()) == expected


def test_batch_without_images_has_an_empty_image_tensor(transform):
    batch = [_sample(transform, [], "Yes."), _sample(transform, [], "No, it is not.")]
    enc = padded_collate_mistral3(batch)["encoder_input"]["image"]
    assert enc["pixel_values"].shape == (0, 3, 28, 28)
    assert enc["image_sizes"].shape == (0, 2) and enc["images_per_sample"].tolist() == [0, 0]


def test_pad_to_multiple_and_padding_values():
    batch = [
        {"tokens": [1, 5, 6], "labels": [-100, 5, 6], "mode": "CT"},
        {"tokens": [1, 7], "labels": [-100, 7], "encoder_input": {"image": {"images": [torch.ones(3, 28, 56)]}}},
    ]
    out = padded_collate_mistral3(batch, padding_idx=0, ignore_idx=-1, pad_to_multiple_of=8)
    assert out["tokens"].tolist() == [[1, 5, 6] + [0] * 5, [1, 7] + [0] * 6]
    assert out["labels"].tolist() == [[-100, 5, 6] + [-1] * 5, [-100, 7] + [-1] * 6]
    assert set(out) == {"tokens", "labels", "encoder_input"}  # metadata such as mode stays out of the batch
    pv = out["encoder_input"]["image"]["pixel_values"]
    assert pv.shape == (1, 3, 28, 56) and (pv == 1).all()


def test_zero_padding_is_bottom_right():
    a, b = torch.full((3, 28, 84), 2.0), torch.full((3, 56, 28), 3.0)
    batch = [{"tokens": [1], "labels": [1], "encoder_input": {"image": {"images": [a, b]}}}]
    pv = padded_collate_mistral3(batch)["encoder_input"]["image"]["pixel_values"]
    assert pv.shape == (2, 3, 56, 84)
    assert (pv[0, :, :28, :84] == 2).all() and (pv[0, :, 28:] == 0).all()
    assert (pv[1, :, :56, :28] == 3).all() and (pv[1, :, :, 28:] == 0).all()


def test_mismatched_lengths_fail_clearly():
    with pytest.raises(ValueError, match="sample 0: 2 tokens but 1 labels"):
        padded_collate_mistral3([{"tokens": [1, 2], "labels": [1]}])


def test_packed_collate_refuses_packs_of_other_lengths_and_mixed_datasets():
    from torch.utils.data import ConcatDataset
    from torchtune_mistral3.data import collate_for_dataset, padded_collate_packed_mistral3

    def pack(n, seq_lens):
        return {"tokens": [5] * n, "labels": [-100] * n, "input_pos": list(range(n)), "seq_lens": seq_lens}

    with pytest.raises(ValueError, match=r"packs of different lengths \[4, 6\]"):
        padded_collate_packed_mistral3([pack(4, [4]), pack(6, [6])])
    with pytest.raises(ValueError, match=r"pack 1: seq_lens \[3\]"):
        padded_collate_packed_mistral3([pack(4, [4]), pack(4, [3])])

    class Packs(list):
        packed = True

    with pytest.raises(ValueError, match="mixes packed=True and packed=False"):
        collate_for_dataset(ConcatDataset([Packs([1]), [1]]), padded_collate_mistral3)
    assert collate_for_dataset(ConcatDataset([Packs([1]), Packs([2])]), None) is padded_collate_packed_mistral3


def test_config_is_packed_reads_one_node_or_a_list():
    from omegaconf import OmegaConf
    from torchtune_mistral3.data import config_is_packed

    cfg = OmegaConf.create({"one": {"packed": True}, "list": [{"split": "train"}, {"packed": True}], "off": {}})
    assert config_is_packed(cfg.one) and config_is_packed(cfg.list) and not config_is_packed(cfg.off)


def test_padded_length_decides_the_batch_length_once():
    from torchtune_mistral3.data import padded_length

    assert padded_length(13) == 13
    assert padded_length(13, pad_to_multiple_of=8) == 16 and padded_length(16, pad_to_multiple_of=8) == 16
    assert padded_length(13, pad_to_length=64) == 64
    assert padded_length(13, pad_to_multiple_of=8, pad_to_length=64) == 64
    with pytest.raises(ValueError, match="a sample of 65 tokens does not fit the fixed batch length 64"):
        padded_length(65, pad_to_length=64)
    with pytest.raises(ValueError, match="pad_to_length=60 is not a multiple of pad_to_multiple_of=8"):
        padded_length(13, pad_to_multiple_of=8, pad_to_length=60)


def test_pad_to_length_pads_every_batch_to_one_length():
    batch = [{"tokens": [1, 5, 6], "labels": [-100, 5, 6]}, {"tokens": [1, 7], "labels": [-100, 7]}]
    out = padded_collate_mistral3(batch, padding_idx=0, ignore_idx=-1, pad_to_length=6)
    assert out["tokens"].tolist() == [[1, 5, 6, 0, 0, 0], [1, 7, 0, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 5, 6, -1, -1, -1], [-100, 7, -1, -1, -1, -1]]


def test_packed_collate_checks_the_layout():
    from torchtune_mistral3.data import padded_collate_packed_mistral3

    pack = {"tokens": [5] * 8, "labels": [-100] * 8, "input_pos": list(range(8)), "seq_lens": [3, 5]}
    out = padded_collate_packed_mistral3([pack], pad_to_length=8, pad_to_multiple_of=4)
    assert out["tokens"].shape == (1, 8) and out["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match=r"packs of 8 tokens, but the batch layout needs 12"):
        padded_collate_packed_mistral3([pack], pad_to_length=12)
