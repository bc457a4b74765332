"""Collate for Mistral 3 VLM samples: right-padded tokens/labels plus one padded tensor of all the batch's images."""

import math
from collections.abc import Sequence
from typing import Any, Callable, Dict, List, Optional

import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

# Empty batches keep a 4-D image tensor so that the model's vision path sees a well-formed (if empty) input.
_EMPTY_IMAGE_HW = 28


def padded_length(longest: int, *, pad_to_multiple_of: int = 1, pad_to_length: Optional[int] = None) -> int:
    """The one place a batch's sequence length is decided: the longest sample, rounded up, or one fixed length.

    Args:
        longest (int): tokens of the batch's longest sample (or pack).
        pad_to_multiple_of (int): round up to this multiple (e.g. the TP degree under sequence parallelism).
            Default is 1.
        pad_to_length (Optional[int]): every batch this long (``tokenizer.max_seq_len``: pipeline stages and
            compiled tensor-parallel blocks are shaped once); it must be a multiple of ``pad_to_multiple_of``.
            Default is None (longest in the batch).

    Returns:
        int: the batch's sequence length.

    Raises:
        ValueError: if a sample is longer than ``pad_to_length``, or ``pad_to_length`` is not a multiple of
            ``pad_to_multiple_of``.
    """
    if pad_to_length is None:
        return math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of
    if pad_to_length % pad_to_multiple_of:
        raise ValueError(f"pad_to_length={pad_to_length} is not a multiple of pad_to_multiple_of={pad_to_multiple_of}")
    if longest > pad_to_length:
        raise ValueError(
            f"a sample of {longest} tokens does not fit the fixed batch length {pad_to_length} "
            "(tokenizer.max_seq_len): the model transform must truncate to it"
        )
    return pad_to_length


def padded_collate_mistral3(
    batch: List[Dict[str, Any]],
    padding_idx: int = 11,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
    pad_to_multiple_of: int = 1,
    pad_to_length: Optional[int] = None,
) -> Dict[str, Any]:
    """Pad a list of transformed samples into the batch a Mistral 3 model consumes, in its final shape.

    Tokens and labels are right-padded (with ``padding_idx`` and ``ignore_idx``) to the length
    :func:`padded_length` decides: the longest sample rounded up to a multiple of ``pad_to_multiple_of``, or
    ``pad_to_length``. Nothing pads the batch again later (the recipe builds this collate with its layout's
    arguments). The images of the whole batch, in sample order and then in order
    within each sample, are stacked into one float tensor, each zero-padded at the bottom and right to the largest
    height and width; their true sizes and the number per sample come alongside. Samples may hold any number of
    images, zero included; other keys (metadata such as ``mode``) are not copied into the batch.

    Args:
        batch (List[Dict[str, Any]]): samples with ``tokens`` and ``labels`` (List[int]) and optionally
            ``encoder_input = {"image": {"images": [Tensor[3, h, w], ...]}}``.
        padding_idx (int): token padding id. Default is 11 (``<pad>``).
        ignore_idx (int): label padding id. Default is -100.
        pad_to_multiple_of (int): round the padded length up to this multiple. Default is 1.
        pad_to_length (Optional[int]): pad every batch to this length instead. Default is None.

    Returns:
        Dict[str, Any]: ``tokens`` LongTensor [B, S], ``labels`` LongTensor [B, S], and
        ``encoder_input = {"image": {"pixel_values": FloatTensor [N, 3, Hmax, Wmax], "image_sizes": LongTensor
        [N, 2] (h, w), "images_per_sample": LongTensor [B]}}``; with no image at all, ``pixel_values`` is
        ``[0, 3, 28, 28]``.

    Raises:
        ValueError: if a sample's tokens and labels differ in length, a sample is longer than ``pad_to_length``,
            or an image is not ``[3, h, w]``.

    Example:
        >>> batch = padded_collate_mistral3([transform(s1), transform(s2)])
        >>> batch["encoder_input"]["image"]["pixel_values"].shape
        torch.Size([2, 3, 112, 168])
    """
    lengths = [len(s["tokens"]) for s in batch]
    for i, s in enumerate(batch):
        if len(s["labels"]) != lengths[i]:
            raise ValueError(f"sample {i}: {lengths[i]} tokens but {len(s['labels'])} labels")
    seq_len = padded_length(max(lengths, default=0), pad_to_multiple_of=pad_to_multiple_of, pad_to_length=pad_to_length)
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


def padded_collate_packed_mistral3(
    batch: List[Dict[str, Any]],
    padding_idx: int = 11,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
    pad_to_multiple_of: int = 1,
    pad_to_length: Optional[int] = None,
) -> Dict[str, Any]:
    """Collate packs of :class:`~torchtune_mistral3.datasets.PackedDataset` (all ``max_seq_len`` tokens long).

    Tokens, labels and images as :func:`padded_collate_mistral3` (``images_per_sample`` counts the images of each
    pack, i.e. of each row of the batch), plus the per-sample positions and the document of every token, from
    which :func:`~torchtune_mistral3.models.mistral3.block_causal_mask` builds the attention mask on the device.

    Args:
        batch (List[Dict[str, Any]]): packs with ``tokens``, ``labels``, ``input_pos``, ``seq_lens`` and
            ``encoder_input``, all of one length.
        padding_idx (int): token padding id (unused: packs are padded already). Default is 11.
        ignore_idx (int): label padding id (unused). Default is -100.
        pad_to_multiple_of (int): the layout's multiple, which the packs' length must already be. Default is 1.
        pad_to_length (Optional[int]): the layout's fixed length, which the packs' length must already be.
            Default is None.

    Returns:
        Dict[str, Any]: the keys of :func:`padded_collate_mistral3`, plus ``input_pos`` LongTensor [B, S]
        (restarting at 0 for every sample) and ``document_ids`` LongTensor [B, S] (index of the token's sample
        within its pack; the padding tail is one more document).

    Raises:
        ValueError: if the packs differ in length, their ``seq_lens`` do not cover them, or their length is not
            the one the layout asks for.

    Example:
        >>> batch = padded_collate_packed_mistral3([packs[0], packs[1]])
        >>> batch["document_ids"][0, :6]
        tensor([0, 0, 0, 1, 1, 1])
    """
    lengths = {len(p["tokens"]) for p in batch}
    if len(lengths) > 1:
        raise ValueError(f"packs of different lengths {sorted(lengths)} in one batch: packs are max_seq_len long")
    length = lengths.pop() if lengths else 0
    wanted = padded_length(length, pad_to_multiple_of=pad_to_multiple_of, pad_to_length=pad_to_length)
    if length and wanted != length:  # padding a pack would leave its document ids short
        raise ValueError(f"packs of {length} tokens, but the batch layout needs {wanted} (tokenizer.max_seq_len)")
    out = padded_collate_mistral3(batch, padding_idx=padding_idx, ignore_idx=ignore_idx)
    for i, p in enumerate(batch):
        if sum(p["seq_lens"]) != len(p["tokens"]) or len(p["input_pos"]) != len(p["tokens"]):
            raise ValueError(f"pack {i}: seq_lens {p['seq_lens']} and input_pos do not cover {len(p['tokens'])} tokens")
    out["input_pos"] = torch.tensor([p["input_pos"] for p in batch], dtype=torch.long)
    out["document_ids"] = torch.stack(
        [torch.repeat_interleave(torch.as_tensor(p["seq_lens"], dtype=torch.long)) for p in batch]
    ).reshape(len(batch), -1)
    return out


def collate_for_dataset(dataset: Any, collate_fn: Callable) -> Callable:
    """The collate a dataset needs: packs (``dataset.packed``) get :func:`padded_collate_packed_mistral3`.

    Args:
        dataset (Any): the training or validation dataset (a ``ConcatDataset`` counts as packed if all its
            parts are).
        collate_fn (Callable): the config's ``collate_fn``, for unpacked data.

    Returns:
        Callable: the collate function.

    Raises:
        ValueError: if packed and unpacked datasets are mixed.
    """
    parts = getattr(dataset, "datasets", [dataset])
    packed = [bool(getattr(d, "packed", False)) for d in parts]
    if any(packed) and not all(packed):
        raise ValueError("the dataset list mixes packed=True and packed=False datasets; set packed on all of them")
    return padded_collate_packed_mistral3 if all(packed) else collate_fn


def config_is_packed(cfg_dataset: Any) -> bool:
    """Whether a config's ``dataset`` node (or list of nodes) asks for packing (``packed: True``).

    Known before the dataset is built, e.g. to check at setup that packs of ``max_seq_len`` fit the model.

    Args:
        cfg_dataset (Any): ``cfg.dataset``, a mapping or a list of mappings.

    Returns:
        bool: True if any node sets ``packed`` (:func:`collate_for_dataset` refuses a mix).
    """
    nodes = cfg_dataset if isinstance(cfg_dataset, Sequence) else [cfg_dataset]
    return any(bool(node.get("packed", False)) for node in nodes)
