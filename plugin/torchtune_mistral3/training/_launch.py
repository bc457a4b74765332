"""Process-group set-up for a recipe started by ``tune run`` with or without torchrun flags."""

import os
import shlex
import socket
from typing import List, Optional, Sequence


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
    *,
    config_name: str,
    tensor_parallel_dim: int = 1,
    pipeline_parallel_dim: int = 1,
    world_size: Optional[int] = None,
    overrides: Sequence[str] = (),
) -> int:
    """Stop at once, before any process group exists, when the launch cannot hold the config's layout.

    Args:
        config_name (str): the config as given to ``--config``, for the message.
        tensor_parallel_dim (int): ``tensor_parallel_dim`` of the config. Default is 1.
        pipeline_parallel_dim (int): ``pipeline_parallel_dim`` of the config. Default is 1.
        world_size (Optional[int]): number of processes; ``WORLD_SIZE`` from the environment if None.
        overrides (Sequence[str]): the user's command-line overrides, repeated in the suggested command.
            Default is none.

    Returns:
        int: the data-parallel degree (what is left of the world size).

    Raises:
        ValueError: if the world size is not a multiple of ``tensor_parallel_dim * pipeline_parallel_dim``;
            the message says which ``tune run`` flags to add.
    """
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    for key, value in (("tensor_parallel_dim", tensor_parallel_dim), ("pipeline_parallel_dim", pipeline_parallel_dim)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    model_parallel = tensor_parallel_dim * pipeline_parallel_dim
    if world_size % model_parallel == 0:
        return world_size // model_parallel
    tail = "".join(" " + shlex.quote(o) for o in overrides)
    per_node = min(model_parallel, 8)
    nodes = model_parallel // per_node
    launch = f"--nproc_per_node {per_node}" + (
        f" --nnodes {nodes} --rdzv_backend c10d --rdzv_endpoint <head-node>:29500" if nodes > 1 else ""
    )
    raise ValueError(
        f"Config '{config_name}' needs a multiple of tensor_parallel_dim x pipeline_parallel_dim = "
        f"{tensor_parallel_dim} x {pipeline_parallel_dim} = {model_parallel} processes, but {world_size} "
        f"{'was' if world_size == 1 else 'were'} launched. Start it with\n"
        f"    tune run {launch} full_finetune_distributed --config {config_name}{tail}\n"
        f"or lower the layout on the command line, e.g. tensor_parallel_dim=1 pipeline_parallel_dim=1."
    )


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
