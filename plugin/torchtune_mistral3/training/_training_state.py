"""Exact resume: every rank saves and reloads what it holds (weights, optimizer state, data position, RNG).

Each rank writes one file with its local shards, so nothing is gathered, every layout (FSDP, TP, PP and
their mixes) is covered, and the resumed run continues bit for bit. The price: a run resumes with the
layout it was saved with (the HF checkpoint written next to it is the portable format). A directory is
written under a temporary name and renamed by rank 0 once every rank has finished, so a crash leaves the
previous state intact.

States are read with ``torch.load(weights_only=True)``: they hold only tensors, numbers, strings and builtin
containers (model and optimizer tensors, the step counters, the data loader's and LR scheduler's state dicts,
the RNG states), which torch's restricted unpickler accepts with no extra allow-listed global, so a tampered
file in a shared ``output_dir`` cannot run code on resume. A newest state that cannot be read (only a damaged
disk or copy can produce one, since it is renamed into place only when complete) is skipped with a warning
for the previous one; all ranks decide together.
"""

import json
import logging
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

log = logging.getLogger(__name__)

STATE_DIR = "training_state"
RUN_FILE = "run.json"  # the record of the run that wrote a state (see _run_identity)
_PREFIX = "step_"
# Globals torch's weights_only unpickler must accept beyond its defaults (tensors, builtin containers,
# numbers, strings, None): none, for the state save_training_state writes. A state holding another object
# (e.g. an optimizer whose state is a tensor subclass) needs it named here, never weights_only=False.
SAFE_GLOBALS: List[Any] = []


class UnsafeTrainingStateError(pickle.UnpicklingError):
    """A training state file holds objects other than tensors and builtin containers; it was not loaded."""


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
    steps = _complete_states(output_dir)
    return steps[0] if steps else None


def _complete_states(output_dir: Union[str, Path]) -> List[Path]:
    """Every ``training_state/step_<N>`` directory (complete: renamed into place), newest first."""
    root = Path(output_dir) / STATE_DIR
    steps = [p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and p.name[len(_PREFIX) :].isdigit()]
    return sorted(steps, key=lambda p: int(p.name[len(_PREFIX) :]), reverse=True)


def _all_ranks(value: Any) -> List[Any]:
    """``value`` of every rank (a list of one outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def save_training_state(
    output_dir: Union[str, Path],
    step: int,
    *,
    layout: Dict[str, int],
    model_parts: Sequence[nn.Module],
    optimizer: Optimizer,
    extra: Dict[str, Any],
    keep_last: int = 2,
    run_record: Optional[Dict[str, Any]] = None,
    replace_other_runs: bool = False,
) -> Path:
    """Save this rank's training state; call on every rank.

    With ``run_record`` (holding the run's ``run_id``), the state records the run that wrote it (its
    ``run.json``) and retention counts only this run's states: a state of another run is never kept in place of
    one of this run, and is deleted only with ``replace_other_runs`` (``overwrite_output_dir=True``), after this
    state is complete.

    Args:
        output_dir (Union[str, Path]): the run's ``output_dir``.
        step (int): optimizer steps done; names the directory ``training_state/step_<step>``.
        layout (Dict[str, int]): world size and parallel degrees; checked on resume.
        model_parts (Sequence[nn.Module]): this rank's model (or pipeline stages).
        optimizer (Optimizer): the optimizer over their parameters.
        extra (Dict[str, Any]): picklable recipe state (step counters, data loader, LR scheduler).
        keep_last (int): complete states of this run to keep; older ones are deleted. Default is 2.
        run_record (Optional[Dict[str, Any]]): the run's record (``run_id``, config, data, steps per epoch),
            written as ``run.json`` and checked on resume. Default is None: no record, every state counts as
            this run's.
        replace_other_runs (bool): delete the states of other runs once this one is complete. Default is False.

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
        "model": [_changing_state(part) for part in model_parts],
        "optimizer": _optimizer_state_to_local(optimizer.state_dict()),
        "extra": extra,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state()
    path = _rank_file(partial, rank)
    try:
        torch.save(state, path)
        error = None
    except (OSError, RuntimeError) as e:  # disk full: "basic_ios::clear: iostream error", file too large, EIO
        error = f"{path}: {type(e).__name__}: {e}"
    errors = [e for e in _all_ranks(error) if e is not None]
    if errors:
        previous = latest_training_state(output_dir)
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        kept = f"the previous state {previous} is intact" if previous else "no earlier training state exists"
        raise OSError(
            f"Writing the training state of step {step} failed (is the disk full?): {'; '.join(errors)}. "
            f"The partial directory was removed and {kept}; free space under {root} and resume from it "
            "with resume_from_checkpoint=True."
        )
    if rank == 0:
        (partial / "layout.json").write_text(json.dumps(layout, sort_keys=True))
        if run_record is not None:
            (partial / RUN_FILE).write_text(json.dumps(run_record, indent=1, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        _retain(root, keep_last, None if run_record is None else run_record["run_id"], replace_other_runs)
    dist.barrier()
    return final


def _run_of(directory: Path) -> Optional[str]:
    try:
        return json.loads((directory / RUN_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _retain(root: Path, keep_last: int, run_id: Optional[str], replace_other_runs: bool) -> None:
    """Delete this run's states beyond the ``keep_last`` newest (and other runs' with ``replace_other_runs``)."""
    done = sorted(
        (p for p in root.glob(f"{_PREFIX}*") if p.name[len(_PREFIX) :].isdigit()),
        key=lambda p: int(p.name[len(_PREFIX) :]),
    )
    own = [p for p in done if run_id is None or _run_of(p) == run_id]
    doomed = own[:-keep_last] if keep_last > 0 else []
    if replace_other_runs:
        doomed += [p for p in done if p not in own]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)


def read_training_state(path: Union[str, Path]) -> Dict[str, Any]:
    """Read one rank's training state file with torch's restricted (``weights_only``) unpickler.

    Args:
        path (Union[str, Path]): a ``rank_<N>.pt`` file.

    Returns:
        Dict[str, Any]: the saved state.

    Raises:
        UnsafeTrainingStateError: if the file holds objects beyond tensors and builtin containers (it was
            tampered with or written by other code); nothing of it is executed.
        RuntimeError: if the file cannot be read (truncated or damaged); the message names it.
    """
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # a global (class, function) outside the allow-list is what a pickle carrying code needs
        refused = [line for line in str(e).splitlines() if "GLOBAL" in line]
        if refused:
            raise UnsafeTrainingStateError(
                f"{path} holds objects other than tensors and builtin containers, so it was not loaded (loading "
                "it could run code). A state written by this plugin never does: was the file replaced? Delete "
                f"it and resume from an earlier state, or start a new run. torch: {refused[0].strip()}"
            ) from e
        raise RuntimeError(f"{path} cannot be read ({type(e).__name__}: {_first_line(e)})") from e
    except Exception as e:  # truncated zip, garbage bytes: RuntimeError, KeyError, EOFError ...
        raise RuntimeError(f"{path} cannot be read ({type(e).__name__}: {_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else repr(e)


def _check_layout(directory: Path, layout: Dict[str, int]) -> None:
    saved_layout = json.loads((directory / "layout.json").read_text())
    if saved_layout != layout:
        raise ValueError(
            f"{directory} was saved with layout {saved_layout}, this run has {layout}: resume with the same "
            "number of processes and parallel degrees, or start a new run from the HF checkpoint "
            "(checkpoint_dir=<output_dir>/epoch_<N>), which loads under any layout but restarts the optimizer."
        )


def _read_this_rank(directory: Path) -> Tuple[Optional[Dict[str, Any]], Optional[Tuple[str, str]]]:
    """This rank's state in ``directory``, or None and (kind, message) with kind "refused" or "damaged"."""
    path = _rank_file(directory, dist.get_rank())
    if not path.is_file():
        return None, ("damaged", f"{path} is missing")
    try:
        return read_training_state(path), None
    except UnsafeTrainingStateError as e:
        return None, ("refused", str(e))
    except RuntimeError as e:
        return None, ("damaged", str(e))


def load_training_state(
    output_dir: Union[str, Path],
    *,
    layout: Dict[str, int],
    model_parts: Sequence[nn.Module],
    optimizer: Optimizer,
    check: Optional[Callable[[Path], None]] = None,
) -> Tuple[Path, Dict[str, Any]]:
    """Restore this rank's weights, optimizer state and RNG from the newest readable training state.

    Call it on every rank. A state some rank cannot read (truncated, damaged or missing file: only a damaged
    disk or copy produces one, as states are renamed into place only when complete) is skipped for the
    previous one with a warning naming the files; every rank gets the same verdict, so all resume from the
    same step.

    Args:
        output_dir (Union[str, Path]): the run's ``output_dir`` (states under ``training_state/step_<N>``).
        layout (Dict[str, int]): this run's world size and parallel degrees.
        model_parts (Sequence[nn.Module]): this rank's model (or pipeline stages), already built and sharded.
        optimizer (Optimizer): the optimizer over their parameters.
        check (Optional[Callable[[Path], None]]): called with the state directory before it is read; raises
            (``ValueError``) to refuse it, e.g. :func:`check_resumable`. Default is None.

    Returns:
        Tuple[Path, Dict[str, Any]]: the directory loaded and the ``extra`` saved with it.

    Raises:
        FileNotFoundError: if ``output_dir`` holds no training state.
        ValueError: if the state to load was saved with another layout (the message gives both), or ``check``
            refuses it.
        UnsafeTrainingStateError: if a rank's file holds objects other than tensors and builtin containers.
        RuntimeError: if no training state is readable on every rank (every file that failed is named).
    """
    candidates = _complete_states(output_dir)
    if not candidates:
        raise FileNotFoundError(
            f"resume_from_checkpoint is True but {Path(output_dir) / STATE_DIR} holds no saved step: run with "
            "save_every_n_steps=N to write resumable states, or set resume_from_checkpoint=False"
        )
    failures: List[str] = []
    for directory in candidates:
        try:
            _check_layout(directory, layout)
        except (OSError, json.JSONDecodeError) as e:  # the same file (and verdict) for every rank
            state, problem = None, ("damaged", f"{directory / 'layout.json'} cannot be read ({e})")
        else:
            if check is not None:  # the same files and config on every rank: the same verdict
                check(directory)
            state, problem = _read_this_rank(directory)
        problems = [p for p in _all_ranks(problem) if p is not None]
        refused = [msg for kind, msg in problems if kind == "refused"]
        if refused:
            raise UnsafeTrainingStateError("; ".join(refused))
        if problems:
            failures += [msg for _, msg in problems]
            if dist.get_rank() == 0:
                log.warning(
                    f"Skipping training state {directory}: {'; '.join(msg for _, msg in problems)}. It was written "
                    "atomically (renamed into place only when complete), so its disk or a copy damaged it; trying "
                    "the previous state."
                )
            continue
        _apply(state, model_parts, optimizer)
        if failures and dist.get_rank() == 0:
            log.warning(f"Resuming from the previous complete training state {directory} instead of {candidates[0]}")
        return directory, state["extra"]
    raise RuntimeError(f"No training state in {Path(output_dir) / STATE_DIR} is readable: {'; '.join(failures)}")


def _changing_state(part: nn.Module) -> Dict[str, torch.Tensor]:
    """This rank's trainable parameters and persistent buffers of ``part``, on the CPU.

    Frozen parameters (a frozen vision tower, a LoRA run's whole base) are left out: the resumed run loads them
    from ``checkpointer.checkpoint_dir`` at set-up, as the first run did, and training never changes them.
    """
    return {k: _local(v).detach().cpu() for k, v in part.state_dict(keep_vars=True).items() if _changes(v)}


def _changes(value: torch.Tensor) -> bool:
    """bool: a state-dict entry that training can change (a trainable parameter or a buffer)."""
    return not isinstance(value, nn.Parameter) or value.requires_grad


def _apply(state: Dict[str, Any], model_parts: Sequence[nn.Module], optimizer: Optimizer) -> None:
    with torch.no_grad():
        for part, saved in zip(model_parts, state["model"]):
            current = part.state_dict(keep_vars=True)
            missing = [k for k, v in current.items() if k not in saved and _changes(v)]
            if missing:
                raise ValueError(
                    f"The training state has no saved value for the trainable {missing[:4]}"
                    f"{' and more' if len(missing) > 4 else ''}: it was written by a run that kept them frozen. "
                    "Resume with the same *_trainable settings as that run, or start afresh with "
                    "resume_from_checkpoint=False."
                )
            for key, value in current.items():
                if key in saved:  # older states hold the frozen weights too: the same values, copied again
                    _local(value.detach()).copy_(saved[key])
    optimizer.load_state_dict(state["optimizer"])
    _optimizer_state_to_dtensor(optimizer)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])


def _optimizer_state_to_local(sd: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "state": {
            i: {k: _local(v).detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
            for i, s in sd["state"].items()
        },
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
