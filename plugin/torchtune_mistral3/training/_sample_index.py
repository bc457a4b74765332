"""Carry each sample's dataset index through the data loader, so a failing step can name its rows."""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

SAMPLE_INDEX_KEY = "dataset_indices"


class IndexedDataset(Dataset):
    """A map-style dataset whose items are ``(index, sample)``; length and samples are the wrapped dataset's.

    Args:
        dataset (Dataset): the dataset to wrap.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[int, Any]:
        return index, self.dataset[index]


class IndexedCollate:
    """Collate ``(index, sample)`` pairs with ``collate``; the indices go under ``SAMPLE_INDEX_KEY``.

    A pack of samples (an item with ``rows``, see :class:`~torchtune_mistral3.datasets.PackedDataset`) contributes
    the dataset rows of its samples instead of its own index, so the indices name (and count) samples either way.

    Args:
        collate (Callable[[List[Any]], Dict[str, Any]]): the collate function of the plain samples.
    """

    def __init__(self, collate: Callable[[List[Any]], Dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, items: List[Tuple[int, Any]]) -> Dict[str, Any]:
        batch = self.collate([sample for _, sample in items])
        indices = [row for index, sample in items for row in sample.get("rows", [index])]
        batch[SAMPLE_INDEX_KEY] = torch.tensor(indices, dtype=torch.long)
        return batch


def pop_sample_indices(batch: Dict[str, Any]) -> List[int]:
    """Remove the dataset indices from a batch built by :class:`IndexedCollate` and return them.

    Args:
        batch (Dict[str, Any]): the collated batch; changed in place.

    Returns:
        List[int]: the dataset index of each sample (empty if the batch carries none).
    """
    indices = batch.pop(SAMPLE_INDEX_KEY, None)
    return [] if indices is None else [int(i) for i in indices.tolist()]


def count_step_data(
    batches: Sequence[Dict[str, Any]],
    num_samples: int,
    pad_id: int,
    group: Optional[torch.distributed.ProcessGroup] = None,
) -> Dict[str, float]:
    """Samples, real (non-padding) tokens and padding fraction of one optimizer step, over data-parallel ranks.

    Args:
        batches (Sequence[Dict[str, Any]]): this rank's micro-batches (``tokens`` on the device).
        num_samples (int): samples in them (``len`` of the popped sample indices; a pack counts its samples).
        pad_id (int): the padding token.
        group (Optional[torch.distributed.ProcessGroup]): the data-parallel group. Default is None (the world).

    Returns:
        Dict[str, float]: ``samples``, ``input_tokens`` (real tokens) and ``padding_fraction`` (padding over all
        token slots of the step).
    """
    device = batches[0]["tokens"].device
    real = sum((b["tokens"] != pad_id).sum() for b in batches)
    slots = sum(b["tokens"].numel() for b in batches)
    counts = torch.stack([torch.as_tensor(x, device=device, dtype=torch.long) for x in (num_samples, real, slots)])
    torch.distributed.all_reduce(counts, group=group)
    samples, real, slots = counts.tolist()
    return {"samples": samples, "input_tokens": real, "padding_fraction": 1 - real / max(slots, 1)}
