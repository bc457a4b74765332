"""Carry each sample's dataset index through the data loader, so a failing step can name its rows."""

from typing import Any, Callable, Dict, List, Tuple

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

    Args:
        collate (Callable[[List[Any]], Dict[str, Any]]): the collate function of the plain samples.
    """

    def __init__(self, collate: Callable[[List[Any]], Dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, items: List[Tuple[int, Any]]) -> Dict[str, Any]:
        batch = self.collate([sample for _, sample in items])
        batch[SAMPLE_INDEX_KEY] = torch.tensor([index for index, _ in items], dtype=torch.long)
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
