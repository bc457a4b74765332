"""Process-group set-up for a recipe started by ``tune run`` with or without torchrun flags."""

import contextlib
import functools
import os
import shlex
import socket
import traceback
from datetime import timedelta
from types import ModuleType
from typing import Any, Iterator, List, Mapping, Optional, Sequence

import torch.distributed as dist

from ._parallel_dims import ParallelDims, WorldSizeError

# Longest legitimate wait of one rank for the others, with margin: rank 0 writing a prepared checkpoint,
# a 128B FP8 checkpoint read from shared storage unevenly across ranks, a checkpoint save, the first step's
# compilation. 30 minutes is torch's own default for gloo; NCCL's is 10 minutes, too short for those.
DEFAULT_DISTRIBUTED_TIMEOUT_S = 1800


class DistributedTimeoutError(RuntimeError):
    """A collective did not complete within ``distributed_timeout_s``."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_single_process_env() -> bool:
    """Fill in the torch.distributed environment of a one-process run when no launcher set it.

    ``tune run <recipe> --config X`` without torchrun flags runs the recipe in the ``tune`` process itself,
    where ``RANK`` and friends are unset and ``init_process_group`` would fail with "RANK expected".

    Returns:
        bool: True if the variables were missing and have been set for a world of one process.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return False
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
    )
    return True


def command_line_overrides(argv: Sequence[str]) -> List[str]:
    """The arguments the recipe received besides ``--config <path>``: the user's ``key=value`` overrides.

    ``tune run`` (with or without torchrun flags) hands the recipe ``[recipe, --config, <path>, *overrides]``.

    Args:
        argv (Sequence[str]): the recipe's ``sys.argv``.

    Returns:
        List[str]: the overrides, in the order given.
    """
    args = list(argv[1:])
    if "--config" in args:
        i = args.index("--config")
        del args[i : i + 2]
    return [a for a in args if not a.startswith("--config=")]


def check_world_size(
    cfg: Mapping[str, Any],
    *,
    config_name: str,
    world_size: Optional[int] = None,
    overrides: Sequence[str] = (),
) -> ParallelDims:
    """Stop at once, before any process group exists, when the launch cannot hold the config's layout.

    Args:
        cfg (Mapping[str, Any]): the config (its ``tensor_parallel_dim`` and ``pipeline_parallel_dim``).
        config_name (str): the config as given to ``--config``, for the message.
        world_size (Optional[int]): number of processes; ``WORLD_SIZE`` from the environment if None.
        overrides (Sequence[str]): the user's command-line overrides, repeated in the suggested command.
            Default is none.

    Returns:
        ParallelDims: the layout on this world size (data parallel takes the rest).

    Raises:
        ValueError: if the world size is not a multiple of ``tensor_parallel_dim * pipeline_parallel_dim``;
            the message says which ``tune run`` flags to add.
    """
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        return ParallelDims.from_config(cfg, world_size)
    except WorldSizeError as e:
        tp, pp, model_parallel = e.tp, e.pp, e.tp * e.pp
    tail = "".join(" " + shlex.quote(o) for o in overrides)
    per_node = min(model_parallel, 8)
    nodes = model_parallel // per_node
    launch = f"--nproc_per_node {per_node}" + (
        f" --nnodes {nodes} --rdzv_backend c10d --rdzv_endpoint <head-node>:29500" if nodes > 1 else ""
    )
    raise ValueError(
        f"Config '{config_name}' needs a multiple of tensor_parallel_dim x pipeline_parallel_dim = "
        f"{tp} x {pp} = {model_parallel} processes, but {world_size} "
        f"{'was' if world_size == 1 else 'were'} launched. Start it with\n"
        f"    tune run {launch} full_finetune_distributed --config {config_name}{tail}\n"
        f"or lower the layout on the command line, e.g. tensor_parallel_dim=1 pipeline_parallel_dim=1."
    )


def newest_epoch_dir(output_dir: str) -> Optional[str]:
    """The ``epoch_<N>`` checkpoint with the highest N under a run's ``output_dir`` (holding a config.json), if any.

    Args:
        output_dir (str): a directory.

    Returns:
        Optional[str]: the path, or None.
    """
    if not os.path.isdir(output_dir):
        return None
    epochs = [
        (int(name[len("epoch_"):]), os.path.join(output_dir, name))
        for name in os.listdir(output_dir)
        if name.startswith("epoch_") and name[len("epoch_"):].isdigit()
        and os.path.isfile(os.path.join(output_dir, name, "config.json"))
    ]
    return max(epochs)[1] if epochs else None


def check_checkpoint_dir(checkpoint_dir: Optional[str], hf_repo: Optional[str]) -> None:
    """Stop at once, with the download command, when the model's checkpoint directory is missing.

    Args:
        checkpoint_dir (Optional[str]): ``checkpointer.checkpoint_dir`` of the config.
        hf_repo (Optional[str]): the Hugging Face repository the config's model comes from, if known.

    Raises:
        FileNotFoundError: if ``checkpoint_dir`` has no ``config.json``; the message holds the
            ``tune download`` command that fetches the model.
    """
    if checkpoint_dir is None or os.path.isfile(os.path.join(checkpoint_dir, "config.json")):
        return
    saved = newest_epoch_dir(checkpoint_dir)
    if saved is not None:  # a run's output_dir: its checkpoints are the epoch_<N> directories
        raise FileNotFoundError(
            f"Checkpoint directory '{checkpoint_dir}' holds no config.json; it is a run's output_dir, whose newest "
            f"checkpoint is {saved}: set checkpoint_dir={saved}"
        )
    what = "does not exist" if not os.path.isdir(checkpoint_dir) else "holds no config.json"
    fetch = (
        f"Download the model first:\n    tune download {hf_repo} --output-dir {checkpoint_dir}\n"
        if hf_repo
        else "Download the model's Hugging Face checkpoint into it first.\n"
    )
    raise FileNotFoundError(
        f"Checkpoint directory '{checkpoint_dir}' {what}. {fetch}"
        "or point the config at an existing copy with checkpoint_dir=<path>."
    )


def distributed_timeout(timeout_s: Optional[float]) -> timedelta:
    """The config key ``distributed_timeout_s`` as a timedelta (None: ``DEFAULT_DISTRIBUTED_TIMEOUT_S``).

    Args:
        timeout_s (Optional[float]): seconds a collective may wait for the other ranks.

    Returns:
        timedelta: the timeout.

    Raises:
        ValueError: if it is not a positive number.
    """
    if timeout_s is None:
        timeout_s = DEFAULT_DISTRIBUTED_TIMEOUT_S
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise ValueError(f"distributed_timeout_s must be a positive number of seconds, got {timeout_s!r}")
    return timedelta(seconds=timeout_s)


@contextlib.contextmanager
def init_process_group_timeout(recipe_module: ModuleType, timeout: timedelta) -> Iterator[None]:
    """Make ``recipe_module``'s own ``init_process_group`` call (the stock recipe's ``__init__``) use ``timeout``.

    Args:
        recipe_module (ModuleType): the stock recipe module, which imported ``init_process_group``.
        timeout (timedelta): timeout of the default process group.

    Yields:
        None: while the stock ``__init__`` runs.
    """
    original = recipe_module.init_process_group
    recipe_module.init_process_group = functools.partial(original, timeout=timeout)
    try:
        yield
    finally:
        recipe_module.init_process_group = original


def set_mesh_timeout(mesh: "dist.DeviceMesh", timeout: timedelta) -> None:
    """Give every process group of ``mesh`` ``timeout`` (torch creates sub-groups with its default, not the world's).

    Args:
        mesh (dist.DeviceMesh): the recipe's device mesh.
        timeout (timedelta): the timeout.
    """
    from torch.distributed.distributed_c10d import _set_pg_timeout

    for name in mesh.mesh_dim_names or ():
        group = mesh[name].get_group()
        if group.size() > 1:
            _set_pg_timeout(timeout, group)


def _timeout_message(error: BaseException, timeout: timedelta) -> Optional[str]:
    text = str(error)
    if "timed out" not in text.lower() and "timeout" not in text.lower():
        return None
    frames = traceback.extract_tb(error.__traceback__)
    collective = next((f.name for f in reversed(frames) if f.filename.endswith("distributed_c10d.py")), None)
    caller = next((f for f in reversed(frames) if "/torch/" not in f.filename), None)
    where = f" called from {caller.name} ({caller.filename}:{caller.lineno})" if caller else ""
    return (
        f"Collective {collective or '(unknown)'}{where} did not complete within distributed_timeout_s="
        f"{timeout.total_seconds():g} on rank {dist.get_rank() if dist.is_initialized() else '?'}: another rank "
        "is stuck (stopped, deadlocked, or far slower than this one). Look at the other ranks' last output; raise "
        f"distributed_timeout_s if the wait is legitimate (e.g. slow checkpoint storage). torch said: {text}"
    )


@contextlib.contextmanager
def explain_collective_timeouts(timeout: timedelta) -> Iterator[None]:
    """Re-raise a collective's timeout as :class:`DistributedTimeoutError` naming the collective and the key.

    Args:
        timeout (timedelta): the timeout in force, for the message.

    Yields:
        None: while the recipe runs.

    Raises:
        DistributedTimeoutError: when a collective timed out inside the block.
    """
    try:
        yield
    except RuntimeError as e:
        message = _timeout_message(e, timeout)
        if message is None:
            raise
        raise DistributedTimeoutError(message) from e
