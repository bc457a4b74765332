"""Collate for Mistral 3 VLM samples: right-padded tokens/labels plus one padded tensor of all the batch's images."""

import math
from typing import Any, Dict, List

import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

# Empty batches keep a 4-D image tensor so that the model's vision path sees a well-formed (if empty) input.
_EMPTY_IMAGE_HW = 28


def padded_collate_mistral3(
    batch: List[Dict[str, Any]],
    padding_idx: int = 11,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
    pad_to_multiple_of: int = 1,
) -> Dict[str, Any]:
    """Pad a list of transformed samples into the batch a Mistral 3 model consumes.

    Tokens and labels are right-padded (with ``padding_idx`` and ``ignore_idx``) to the longest sample, rounded up
    to a multiple of ``pad_to_multiple_of``. The images of the whole batch, in sample order and then in order
    within each sample, are stacked into one float tensor, each zero-padded at the bottom and right to the largest
    height and width; their true sizes and the number per sample come alongside. Samples may hold any number of
    images, zero included; other keys (metadata such as ``mode``) are not copied into the batch.

    Args:
        batch (List[Dict[str, Any]]): samples with ``tokens`` and ``labels`` (List[int]) and optionally
            ``encoder_input = {"image": {"images": [Tensor[3, h, w], ...]}}``.
        padding_idx (int): token padding id. Default is 11 (``<pad>``).
        ignore_idx (int): label padding id. Default is -100.
        pad_to_multiple_of (int): round the padded length up to this multiple. Default is 1.

    Returns:
        Dict[str, Any]: ``tokens`` LongTensor [B, S], ``labels`` LongTensor [B, S], and
        ``encoder_input = {"image": {"pixel_values": FloatTensor [N, 3, Hmax, Wmax], "image_sizes": LongTensor
        [N, 2] (h, w), "images_per_sample": LongTensor [B]}}``; with no image at all, ``pixel_values`` is
        ``[0, 3, 28, 28]``.

    Raises:
        ValueError: if a sample's tokens and labels differ in length or an image is not ``[3, h, w]``.

    Example:
        >>> batch = padded_collate_mistral3([transform(s1), transform(s2)])
        >>> batch["encoder_input"]["image"]["pixel_values"].shape
        torch.Size([2, 3, 112, 168])
    """
    lengths = [len(s["tokens"]) for s in batch]
    for i, s in enumerate(batch):
        if len(s["labels"]) != lengths[i]:
            raise ValueError(f"sample {i}: {lengths[i]} tokens but {len(s['labels'])} labels")
    seq_len = math.ceil(max(lengths, default=0) / pad_to_multiple_of) * pad_to_multiple_of
    tokens = torch.full((len(batch), seq_len), padding_idx, dtype=torch.long)
    labels = torch.full((len(batch), seq_len), ignore_idx, dtype=torch.long)
    for i, s in enumerate(batch):
        tokens[i, : lengths[i]] = torch.as_tensor(s["tokens"], dtype=torch.long)
        labels[i, : lengths[i]] = torch.as_tensor(s["labels"], dtype=torch.long)

    per_sample = [s.get("encoder_input", {}).get("image", {}).get("images", []) for s in batch]
    images = [img for imgs in per_sample for img in imgs]
    for img in images:
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"images must be [3, h, w] tensors, got shape {tuple(img.shape)}")
    if images:
        h_max = max(img.shape[1] for img in images)
        w_max = max(img.shape[2] for img in images)
        pixel_values = torch.zeros(len(images), 3, h_max, w_max, dtype=torch.float32)
        for n, img in enumerate(images):
            pixel_values[n, :, : img.shape[1], : img.shape[2]] = img
    else:
        pixel_values = torch.zeros(0, 3, _EMPTY_IMAGE_HW, _EMPTY_IMAGE_HW, dtype=torch.float32)
    image_sizes = torch.tensor([list(img.shape[1:]) for img in images], dtype=torch.long).reshape(-1, 2)
    images_per_sample = torch.tensor([len(imgs) for imgs in per_sample], dtype=torch.long)
    return {
        "tokens": tokens,
        "labels": labels,
        "encoder_input": {
            "image": {"pixel_values": pixel_values, "image_sizes": image_sizes, "images_per_sample": images_per_sample}
        },
    }
