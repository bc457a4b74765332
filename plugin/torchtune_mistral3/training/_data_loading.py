"""Data-loader workers (images decoded and resized off the training process) and the run's compile counter."""

from typing import Any, Dict, Optional


def loader_worker_options(num_workers: int, prefetch_factor: Optional[int], device_type: str) -> Dict[str, Any]:
    """``StatefulDataLoader`` keyword arguments for ``num_workers`` worker processes.

    With workers, each keeps ``prefetch_factor`` batches ready and stays alive across epochs (the dataset and the
    tokenizer are not pickled again each epoch); on CUDA the batches come in pinned memory, so the copy to the GPU
    can run asynchronously. With 0 workers the batches are made on the training process, between steps.

    Args:
        num_workers (int): the config's ``num_workers``: worker processes per data loader (0: none).
        prefetch_factor (Optional[int]): the config's ``prefetch_factor``: batches each worker prepares ahead;
            None for torch's default (2). Ignored without workers.
        device_type (str): the training device's type (``cuda`` pins memory).

    Returns:
        Dict[str, Any]: ``num_workers``, ``pin_memory`` and, with workers, ``prefetch_factor`` and
        ``persistent_workers``.

    Raises:
        ValueError: naming the key, if ``num_workers`` is negative or ``prefetch_factor`` is below 1.
    """
    if int(num_workers) < 0:
        raise ValueError(f"num_workers={num_workers} must be 0 (load on the training process) or more")
    options: Dict[str, Any] = {"num_workers": int(num_workers), "pin_memory": device_type == "cuda"}
    if int(num_workers) == 0:
        return options
    if prefetch_factor is not None and int(prefetch_factor) < 1:
        raise ValueError(f"prefetch_factor={prefetch_factor} must be at least 1 (batches per worker kept ready), "
                         "or null for torch's default of 2")
    options.update(prefetch_factor=None if prefetch_factor is None else int(prefetch_factor), persistent_workers=True)
    if options["prefetch_factor"] is None:
        del options["prefetch_factor"]
    return options


def compiled_graph_count() -> int:
    """Graphs torch.compile (dynamo) has compiled in this process so far; a rise after warm-up is a recompile.

    Returns:
        int: dynamo's ``stats.unique_graphs`` counter.
    """
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])

