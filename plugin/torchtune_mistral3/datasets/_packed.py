"""Packing of whole multimodal samples into fixed-length sequences (``packed=True`` on the dataset builders).

A pack is ``max_seq_len`` tokens: the concatenation of whole samples (never split, each with its images), then
padding. Each token carries its position inside its own sample (restarting at 0), and the pack carries the
length of every sample, from which the model's block-causal document mask is built (see
:func:`~torchtune_mistral3.data.padded_collate_packed_mistral3`).
"""

from typing import Any, Dict, List, Sequence

from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX


def pack_first_fit(lengths: Sequence[int], max_seq_len: int, window: int = 64) -> List[List[int]]:
    """Group samples into packs of at most ``max_seq_len`` tokens, first fit over the last ``window`` open packs.

    Samples are taken in order; each goes into the oldest of the last ``window`` packs that still has room, or
    opens a new pack. The result is a pure function of ``lengths`` (no randomness), so every rank and every run
    builds the same packs; the data loader's sampler then shuffles the packs with its seed. Within a pack
    samples keep their dataset order. The bounded window keeps this linear in the number of samples.

    Args:
        lengths (Sequence[int]): token count of each sample, each in ``1..max_seq_len``.
        max_seq_len (int): tokens per pack.
        window (int): how many of the newest packs stay open for later samples. Default is 64.

    Returns:
        List[List[int]]: sample indices of each pack, in order.

    Raises:
        ValueError: if a sample is empty or longer than ``max_seq_len``.

    Example:
        >>> pack_first_fit([5, 4, 3, 2], max_seq_len=8)
        [[0, 2], [1, 3]]
    """
    packs: List[List[int]] = []
    room: List[int] = []  # free tokens of each pack
    first_open = 0
    for i, n in enumerate(lengths):
        if not 0 < n <= max_seq_len:
            raise ValueError(f"sample {i} has {n} tokens; a pack holds 1..max_seq_len={max_seq_len}")
        first_open = max(first_open, len(packs) - window)
        for p in range(first_open, len(packs)):
            if room[p] >= n:
                packs[p].append(i)
                room[p] -= n
                break
        else:
            packs.append([i])
            room.append(max_seq_len - n)
    return packs


class PackedDataset(Dataset):
    """Packs of whole samples of a multimodal dataset, each exactly ``max_seq_len`` tokens.

    torchtune's :class:`~torchtune.datasets.PackedDataset` transforms (and keeps in memory) every sample when it
    is built, which for image data means decoding every image up front; this one packs from token counts
    measured without pixels (the model transform's ``check_length``) and transforms a pack's samples when the
    pack is read.

    Item layout (lists of ints unless said otherwise):

    - ``tokens``: the samples' tokens one after the other, then ``padding_idx`` up to ``max_seq_len``;
    - ``labels``: the samples' labels, with the first label of every sample set to ``ignore_idx`` (it is never
      a target unpacked either: the loss predicts token t + 1 from t, so this keeps the shift from crossing a
      sample boundary), then ``ignore_idx`` over the padding;
    - ``input_pos``: ``0..len-1`` for every sample, and ``0..pad-1`` over the padding;
    - ``seq_lens``: the token count of every sample, then the padding length if non-zero (a document of its
      own, so every query attends at least to itself);
    - ``encoder_input = {"image": {"images": [Tensor[3, h, w], ...]}}``: all images of the pack, sample by
      sample; ``images_per_sample``: how many belong to each sample;
    - ``rows``: the dataset index of every sample.

    Args:
        dataset (Dataset): the unpacked samples (``tokens``, ``labels``, ``encoder_input``).
        lengths (Sequence[int]): each sample's token count, as ``dataset[i]`` returns it.
        max_seq_len (int): tokens per pack.
        padding_idx (int): token id of the padding. Default is 11 (``<pad>``).
        ignore_idx (int): label of the padding and of each sample's first token. Default is -100.

    Raises:
        ValueError: if ``lengths`` does not cover ``dataset`` or a sample does not fit ``max_seq_len``.
    """

    packed = True

    def __init__(
        self,
        dataset: Dataset,
        lengths: Sequence[int],
        max_seq_len: int,
        padding_idx: int = 11,
        ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
    ) -> None:
        if len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} sample lengths for a dataset of {len(dataset)} samples")
        self.dataset = dataset
        self.lengths = list(lengths)
        self.max_seq_len = max_seq_len
        self.padding_idx = padding_idx
        self.ignore_idx = ignore_idx
        self.packs = pack_first_fit(self.lengths, max_seq_len)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        """Transform the samples of pack ``index`` and lay them out in one sequence.

        Args:
            index (int): pack index.

        Returns:
            Dict[str, Any]: see the class docstring.

        Raises:
            ValueError: if a sample's token count differs from the one it was packed with.
        """
        out: Dict[str, Any] = {"tokens": [], "labels": [], "input_pos": [], "seq_lens": [], "rows": []}
        images: List[Any] = []
        images_per_sample: List[int] = []
        for row in self.packs[index]:
            sample = self.dataset[row]
            n = len(sample["tokens"])
            if n != self.lengths[row]:
                raise ValueError(
                    f"sample {row} has {n} tokens but was packed with {self.lengths[row]} (the length measured "
                    "from image headers differs from the transformed sample): check the model transform"
                )
            out["tokens"] += sample["tokens"]
            out["labels"] += [self.ignore_idx] + list(sample["labels"][1:])
            out["input_pos"] += list(range(n))
            out["seq_lens"].append(n)
            out["rows"].append(row)
            sample_images = sample.get("encoder_input", {}).get("image", {}).get("images", [])
            images += sample_images
            images_per_sample.append(len(sample_images))
        pad = self.max_seq_len - len(out["tokens"])
        if pad:
            out["tokens"] += [self.padding_idx] * pad
            out["labels"] += [self.ignore_idx] * pad
            out["input_pos"] += list(range(pad))
            out["seq_lens"].append(pad)
        out["encoder_input"] = {"image": {"images": images}}
        out["images_per_sample"] = images_per_sample
        return out
