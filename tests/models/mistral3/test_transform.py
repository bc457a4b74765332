"""Mistral3Transform: pixels against transformers' PixtralImageProcessorPil, medical image modes, truncation."""

import io

import numpy as np
import pydicom
import pytest
import torch
from _tekken_files import write_tekken
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_windowing
from torchtune.data import Message
from torchtune_mistral3.datasets import MEDPIX_SAMPLE_DIR
from torchtune_mistral3.models.mistral3._transform import (
    PixtralImageTransform,
    medical_image_to_rgb,
    mistral3_transform,
)
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

RNG = np.random.default_rng(0)
IMG, BREAK, END = 10, 12, 13


def _hf(images, max_image_size):
    """transformers' Pixtral processor as the Mistral 3 processor configures it (28 px per token)."""
    proc = PixtralImageProcessorPil(size={"longest_edge": max_image_size}, patch_size={"height": 28, "width": 28})
    out = proc(images=images, return_tensors="np")
    return [torch.from_numpy(p[:, :h, :w].copy()) for p, (h, w) in zip(out["pixel_values"], out["image_sizes"])]


def _rgb(w, h):
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _palette(w, h, transparent=False):
    image = Image.frombytes("P", (w, h), RNG.integers(0, 256, (h, w), dtype=np.uint8).tobytes())
    image.putpalette(RNG.integers(0, 256, 768, dtype=np.uint8).tolist())
    if transparent:
        image.info["transparency"] = 7
    return image


# (image, max_image_size): no resize, upscale to a multiple of 28, downscale past the longest edge, tall and wide.
CASES = {
    "rgb_exact": (_rgb(56, 84), 1540),
    "rgb_up": (_rgb(100, 150), 1540),
    "rgb_down_wide": (_rgb(400, 130), 224),
    "rgb_down_tall": (_rgb(90, 700), 300),
    "rgb_large_default": (_rgb(1700, 900), 1540),
    "gray_L": (Image.fromarray(RNG.integers(0, 256, (77, 133), dtype=np.uint8)), 1540),
    "palette_P": (_palette(120, 64), 1540),
    "palette_transparent": (_palette(64, 120, transparent=True), 1540),
    "rgba": (Image.fromarray(RNG.integers(0, 256, (60, 45, 4), dtype=np.uint8)), 1540),
    "gray_alpha_LA": (Image.fromarray(RNG.integers(0, 256, (50, 70, 2), dtype=np.uint8), mode="LA"), 112),
    "binary_1": (Image.fromarray(RNG.integers(0, 2, (40, 30), dtype=np.uint8) * 255).convert("1"), 1540),
    "cmyk": (_rgb(33, 66).convert("CMYK"), 1540),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pixels_match_transformers_pixtral_processor(name):
    image, max_size = CASES[name]
    ours = PixtralImageTransform(max_image_size=max_size)(image)
    (theirs,) = _hf([image], max_size)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_high_bit_depth_images_are_windowed_then_processed_like_transformers():
    # transformers clips 16-bit values to 255 in convert("RGB"); ours windows first, then follows it exactly.
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array.astype(np.uint16)
    for image in (Image.fromarray(ct), Image.fromarray(ct.astype(np.int32)), Image.fromarray(ct.astype(np.float32))):
        assert image.mode in ("I;16", "I", "F")
        ours = PixtralImageTransform(max_image_size=112)(image)
        (theirs,) = _hf([medical_image_to_rgb(image)], 112)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def _pydicom_window(pixels, center, width):
    """DICOM LINEAR_EXACT windowing to 8 bits, computed by pydicom."""
    ds = Dataset()
    ds.PhotometricInterpretation, ds.BitsStored, ds.PixelRepresentation = "MONOCHROME2", 8, 0
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, "LINEAR_EXACT"
    return np.rint(apply_windowing(pixels.astype(np.float64), ds)).astype(np.uint8)


def test_16bit_ct_min_max_window_is_neither_black_nor_saturated():
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array.astype(np.uint16)  # values 128..2191
    ours = np.asarray(medical_image_to_rgb(Image.fromarray(ct)))
    lo, hi = float(ct.min()), float(ct.max())
    expected = _pydicom_window(ct, (lo + hi) / 2, hi - lo)
    assert np.abs(ours[..., 0].astype(int) - expected.astype(int)).max() <= 1
    assert (ours[..., 0] == ours[..., 1]).all() and (ours[..., 0] == ours[..., 2]).all()
    gray = ours[..., 0]
    assert 40 < gray.mean() < 215 and gray.std() > 20
    assert (gray == 0).mean() < 0.05 and (gray == 255).mean() < 0.05
    naive = np.asarray(Image.fromarray(ct).convert("RGB"))[..., 0]  # what a plain conversion does
    assert (naive == 255).mean() > 0.5


def test_window_stored_with_the_image_is_used():
    # The shipped sample's abdominal CT is a 16-bit PNG carrying a soft-tissue window in its text chunks.
    import pyarrow.parquet as pq

    rows = pq.read_table(MEDPIX_SAMPLE_DIR / "train.parquet").to_pylist()
    png = next(r["image_id"]["bytes"] for r in rows if r["case_id"] == "explicit_VR-UN")
    image = Image.open(io.BytesIO(png))
    assert image.mode == "I;16" and "WindowCenter" in image.info
    center, width = float(image.info["WindowCenter"]), float(image.info["WindowWidth"])
    expected = _pydicom_window(np.asarray(image), center, width)
    ours = np.asarray(medical_image_to_rgb(image))[..., 0]
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1
    minmax = np.asarray(medical_image_to_rgb(Image.fromarray(np.asarray(image))))[..., 0]  # same pixels, no info
    assert np.abs(minmax.astype(int) - ours.astype(int)).mean() > 10


@pytest.fixture(scope="module")
def tekken_path(tmp_path_factory):
    return write_tekken(tmp_path_factory.mktemp("tok"), "v15")


def _conversation(*images, answer="The liver is enlarged."):
    content = [{"type": "image", "content": im} for im in images] + [{"type": "text", "content": "What is seen?"}]
    return [Message("user", content, masked=True), Message("assistant", answer, masked=False)]


def _blocks(tokens):
    """(rows, cols) of each image block, read off the token ids."""
    out, rows, cols = [], 0, 0
    for t in tokens:
        if t == IMG:
            cols += 1
        elif t in (BREAK, END):
            rows += 1
            if t == END:
                out.append((rows, cols // rows))
                rows, cols = 0, 0
    return out


def test_image_token_layout_follows_transformers_sizes(tekken_path):
    images = [_rgb(1700, 900), _rgb(100, 150), _rgb(30, 500)]
    out = mistral3_transform(str(tekken_path), max_seq_len=None)({"messages": _conversation(*images)})
    hf_sizes = [tuple(t.shape[1:]) for t in _hf(images, 1540)]
    assert [tuple(t.shape[1:]) for t in out["encoder_input"]["image"]["images"]] == hf_sizes
    assert _blocks(out["tokens"]) == [(h // 28, w // 28) for h, w in hf_sizes]
    # each block is rows x ([IMG] * cols + [IMG_BREAK]) with the last break replaced by [IMG_END]
    rows, cols = hf_sizes[0][0] // 28, hf_sizes[0][1] // 28
    start = out["tokens"].index(IMG)
    block = ([IMG] * cols + [BREAK]) * rows
    block[-1] = END
    assert out["tokens"][start : start + len(block)] == block


def test_extreme_aspect_ratio_keeps_one_token_row(tekken_path):
    out = mistral3_transform(str(tekken_path))({"messages": _conversation(_rgb(3000, 2))})
    (image,) = out["encoder_input"]["image"]["images"]
    assert image.shape == (3, 28, 1540)


def test_truncation_never_cuts_an_image_block(tekken_path):
    messages = _conversation(_rgb(56, 56)) + _conversation(_rgb(112, 84), answer="A second answer.")
    full = mistral3_transform(str(tekken_path), max_seq_len=None)({"messages": messages})
    blocks = [(i, t) for i, t in enumerate(full["tokens"]) if t in (IMG, BREAK, END)]
    second_start = [i for i, t in blocks if t == END][0] + 1
    second_start = next(i for i, t in blocks if i > second_start)
    # A cut inside the second image's block moves before it and drops that image.
    out = mistral3_transform(str(tekken_path), max_seq_len=second_start + 5)({"messages": messages})
    assert out["tokens"] == full["tokens"][:second_start]
    assert len(out["encoder_input"]["image"]["images"]) == 1
    assert out["mask"] == full["mask"][:second_start]
    # A cut inside the last answer keeps both images and the part of the answer that fits.
    cut = len(full["tokens"]) - 2
    out = mistral3_transform(str(tekken_path), max_seq_len=cut)({"messages": messages})
    assert out["tokens"] == full["tokens"][:cut] and len(out["encoder_input"]["image"]["images"]) == 2
    n_img = sum(t == IMG for t in out["tokens"])
    assert n_img == sum(im.shape[1] * im.shape[2] // 28**2 for im in out["encoder_input"]["image"]["images"])


def test_sample_with_no_room_for_the_answer_fails_clearly(tekken_path):
    with pytest.raises(ValueError, match="max_seq_len=40"):
        mistral3_transform(str(tekken_path), max_seq_len=40)({"messages": _conversation(_rgb(280, 280))})


def test_output_keys_and_metadata_pass_through(tekken_path):
    transform = mistral3_transform(str(tekken_path))
    assert (transform.pad_id, transform.bos_id, transform.eos_id, transform.max_seq_len) == (11, 1, 2, 2048)
    out = transform({"messages": _conversation(_rgb(56, 56)), "mode": "CT", "case_id": "c1"})
    assert set(out) == {"tokens", "mask", "encoder_input", "mode", "case_id"}
    assert out["mode"] == "CT" and len(out["tokens"]) == len(out["mask"])
