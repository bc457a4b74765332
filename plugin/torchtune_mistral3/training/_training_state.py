"""Exact resume: every rank saves and reloads what it holds (weights, optimizer state, data position, RNG).

Each rank writes one file with its local shards, so nothing is gathered, every layout (FSDP, TP, PP and
their mixes) is covered, and the resumed run continues bit for bit. The price: a run resumes with the
layout it was saved with (the HF checkpoint written next to it is the portable format). A directory is
written under a temporary name and renamed by rank 0 once every rank has finished, so a crash leaves the
previous state intact.
"""

import json
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

STATE_DIR = "training_state"
_PREFIX = "step_"


def _local(t: Any) -> Any:
    return t.to_local() if isinstance(t, DTensor) else t


def _rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank_{rank:05d}.pt"


def latest_training_state(output_dir: Union[str, Path]) -> Optional[Path]:
    """The newest complete ``<output_dir>/training_state/step_<N>`` directory, or None.

    Args:
        output_dir (Union[str, Path]): the run's ``output_dir``.

    Returns:
        Optional[Path]: the directory with the largest step, None if there is none.
    """
    root = Path(output_dir) / STATE_DIR
    steps = [p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and p.name[len(_PREFIX) :].isdigit()]
    return max(steps, key=lambda p: int(p.name[len(_PREFIX) :]), default=None)


def save_training_state(
    output_dir: Union[str, Path],
    step: int,
    *,
    layout: Dict[str, int],
    model_parts: Sequence[nn.Module],
    optimizer: Optimizer,
    extra: Dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Save this rank's training state; call on every rank.

    Args:
        output_dir (Union[str, Path]): the run's ``output_dir``.
        step (int): optimizer steps done; names the directory ``training_state/step_<step>``.
        layout (Dict[str, int]): world size and parallel degrees; checked on resume.
        model_parts (Sequence[nn.Module]): this rank's model (or pipeline stages).
        optimizer (Optimizer): the optimizer over their parameters.
        extra (Dict[str, Any]): picklable recipe state (step counters, data loader, LR scheduler).
        keep_last (int): complete states to keep; older ones are deleted. Default is 2.

    Returns:
        Path: the directory written.
    """
    rank = dist.get_rank()
    root = Path(output_dir) / STATE_DIR
    final = root / f"{_PREFIX}{step}"
    partial = root / f".{_PREFIX}{step}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    state = {
        "model": [{k: _local(v).detach().cpu() for k, v in part.state_dict().items()} for part in model_parts],
        "optimizer": _optimizer_state_to_local(optimizer.state_dict()),
        "extra": extra,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, _rank_file(partial, rank))
    dist.barrier()
    if rank == 0:
        (partial / "layout.json").write_text(json.dumps(layout, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        done = sorted(
            (p for p in root.glob(f"{_PREFIX}*") if p.name[len(_PREFIX) :].isdigit()),
            key=lambda p: int(p.name[len(_PREFIX) :]),
        )
        for old in done[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_training_state(
    directory: Union[str, Path],
    *,
    layout: Dict[str, int],
    model_parts: Sequence[nn.Module],
    optimizer: Optimizer,
) -> Dict[str, Any]:
    """Restore this rank's weights, optimizer state and RNG from ``directory``; return the recipe state.

    Args:
        directory (Union[str, Path]): a ``training_state/step_<N>`` directory.
        layout (Dict[str, int]): this run's world size and parallel degrees.
        model_parts (Sequence[nn.Module]): this rank's model (or pipeline stages), already built and sharded.
        optimizer (Optimizer): the optimizer over their parameters.

    Returns:
        Dict[str, Any]: the ``extra`` saved with it.

    Raises:
        ValueError: if the state was saved with another layout (the message gives both).
        FileNotFoundError: if this rank's file is missing.
    """
    directory = Path(directory)
    saved_layout = json.loads((directory / "layout.json").read_text())
    if saved_layout != layout:
        raise ValueError(
            f"{directory} was saved with layout {saved_layout}, this run has {layout}: resume with the same "
            "number of processes and parallel degrees, or start a new run from the HF checkpoint "
            "(checkpoint_dir=<output_dir>/epoch_<N>), which loads under any layout but restarts the optimizer."
        )
    path = _rank_file(directory, dist.get_rank())
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the training state in {directory} is incomplete")
    state = torch.load(path, map_location="cpu", weights_only=False)
    with torch.no_grad():
        for part, saved in zip(model_parts, state["model"]):
            for key, value in part.state_dict().items():
                _local(value).copy_(saved[key])
    optimizer.load_state_dict(state["optimizer"])
    _optimizer_state_to_dtensor(optimizer)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state["extra"]


def _optimizer_state_to_local(sd: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "state": {i: {k: _local(v).detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                  for i, s in sd["state"].items()},
        "param_groups": sd["param_groups"],
    }


def _optimizer_state_to_dtensor(optimizer: Optimizer) -> None:
    """``load_state_dict`` gives plain tensors; a DTensor parameter's moments must be DTensors like it."""
    for group in optimizer.param_groups:
        params: List[torch.Tensor] = group["params"]
        for p in params:
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if isinstance(p, DTensor) and torch.is_tensor(v) and not isinstance(v, DTensor) and v.dim() > 0:
                    state[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False)
