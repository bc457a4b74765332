r"""Print the shipped Slurm batch script for a config and a node count, to copy next to the config.

    python -m torchtune_mistral3.slurm --config mistral3p5_medpix --nodes 8 > mistral3p5_medpix.sbatch
    sbatch mistral3p5_medpix.sbatch checkpoint_dir=/shared/models/Mistral-Medium-3.5-128B

The script runs one torchrun agent per node (``srun`` one task per node, each ``tune run --nnodes N
--nproc_per_node P --rdzv_backend c10d --rdzv_endpoint <first node>:<port>``), sets the Hugging Face cache and
offline flags, W&B and NCCL variables, and resumes a requeued job from the newest complete training state in
``OUTPUT_DIR``. The layout is checked here: ``nodes x nproc-per-node`` must hold the config's
``tensor_parallel_dim x pipeline_parallel_dim`` (the same check and message as ``tune run``).
"""

import argparse
import re
import shlex
import sys
from importlib import resources
from typing import Dict, List, Optional, Sequence

from omegaconf import DictConfig

TEMPLATE = "finetune.sbatch"
_TOKEN = re.compile(r"@([A-Z_]+)@")
DEFAULT_OUTPUT_DIR = "$SLURM_SUBMIT_DIR/output/$SLURM_JOB_NAME"  # the job name stays the same across requeues


def sbatch_template() -> str:
    """The shipped batch script with its ``@NAME@`` placeholders.

    Returns:
        str: the template text.
    """
    return resources.files(__package__).joinpath(TEMPLATE).read_text()


def render_sbatch(
    *,
    config: str,
    nodes: int,
    nproc_per_node: int,
    gpus_per_node: int,
    cpus_per_node: int,
    time: str = "24:00:00",
    partition: Optional[str] = None,
    output_dir: str = DEFAULT_OUTPUT_DIR,
    save_every_n_steps: int = 25,
    python_env: str = "",
    hf_home: str = "$HOME/.cache/huggingface",
    overrides: Sequence[str] = (),
    args: str = "",
) -> str:
    """Fill in the batch script for one launch.

    Args:
        config (str): config name or YAML path given to ``--config``.
        nodes (int): nodes to allocate (one torchrun agent each).
        nproc_per_node (int): processes per node (one per GPU).
        gpus_per_node (int): GPUs to request per node; 0 requests none (CPU configs such as the demo).
        cpus_per_node (int): CPU cores for the node's agent and its processes.
        time (str): the job's time limit. Default is ``24:00:00``.
        partition (Optional[str]): the Slurm partition; the cluster's default if None.
        output_dir (str): the run's ``output_dir`` on shared storage (shell expressions allowed).
            Default is ``$SLURM_SUBMIT_DIR/output/$SLURM_JOB_NAME``.
        save_every_n_steps (int): steps between training states (the most a preemption loses). Default is 25.
        python_env (str): virtual environment to activate on every node; none if empty. Default is "".
        hf_home (str): the shared Hugging Face cache. Default is ``$HOME/.cache/huggingface``.
        overrides (Sequence[str]): ``key=value`` config overrides written into the script. Default is none.
        args (str): the command line that produced the script, for its header. Default is "".

    Returns:
        str: the batch script.

    Raises:
        ValueError: if a count is not positive.
    """
    for name, value in (
        ("nodes", nodes),
        ("nproc_per_node", nproc_per_node),
        ("cpus_per_node", cpus_per_node),
        ("save_every_n_steps", save_every_n_steps),
    ):
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    gpus = f"#SBATCH --gpus-per-node={gpus_per_node}\n#SBATCH --exclusive\n" if gpus_per_node > 0 else ""
    values: Dict[str, str] = {
        "NODES": str(nodes),
        "NPROC": str(nproc_per_node),
        "CONFIG": config,
        "ARGS": args,
        "JOB_NAME": re.sub(r"[^A-Za-z0-9_.-]", "_", config.rsplit("/", 1)[-1].removesuffix(".yaml")),
        "GPUS_LINE": gpus,
        "CPUS": str(cpus_per_node),
        "TIME": time,
        "LOG": "%x-%j.out",
        "PARTITION_LINE": f"#SBATCH --partition={partition}" if partition else "",
        "OUTPUT_DIR": output_dir,
        "SAVE_EVERY": str(save_every_n_steps),
        "PYTHON_ENV": python_env,
        "HF_HOME": hf_home,
        "OVERRIDES": shlex.join(overrides),
    }
    return _TOKEN.sub(lambda m: values[m.group(1)], sbatch_template())


def _load_checked(config: str, overrides: List[str]) -> DictConfig:
    """The config with the overrides, whose keys are checked as ``tune run`` will check them on the nodes."""
    from torchtune_mistral3.planning import load_config
    from torchtune_mistral3.training import check_config_values

    cfg = load_config(config, overrides)
    check_config_values(cfg)
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    """Command line: print the batch script for ``--config`` on ``--nodes`` nodes.

    Args:
        argv (Optional[List[str]]): arguments; ``sys.argv[1:]`` if None.

    Returns:
        int: the exit code (0, or 2 for an unknown key, a wrong value or a layout that does not fit).
    """
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m torchtune_mistral3.slurm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="mistral3p5_medpix", help="config name or YAML path")
    parser.add_argument("--nodes", type=int, default=8, help="nodes (one torchrun agent each); default 8")
    parser.add_argument("--nproc-per-node", type=int, default=8, help="processes (GPUs) per node; default 8")
    parser.add_argument(
        "--gpus-per-node", type=int, default=None, help="GPUs to request; default nproc-per-node, 0 for CPU"
    )
    parser.add_argument("--cpus-per-node", type=int, default=None, help="CPU cores per node; default 8 per process")
    parser.add_argument("--time", default="24:00:00", help="time limit; default 24:00:00")
    parser.add_argument("--partition", default=None, help="Slurm partition; default the cluster's")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="output_dir on shared storage")
    parser.add_argument("--save-every-n-steps", type=int, default=25, help="steps between resumable states; default 25")
    parser.add_argument(
        "--python-env",
        default=sys.prefix if sys.prefix != sys.base_prefix else "",
        help="virtual environment to activate; default this one",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, checked and written into the script")
    a = parser.parse_args(argv)
    try:
        cfg = _load_checked(a.config, a.overrides)
    except (ValueError, FileNotFoundError) as e:  # before the job gets its nodes, not after
        print(f"error: {e}", file=sys.stderr)
        return 2
    from torchtune_mistral3.training import check_world_size

    try:
        check_world_size(cfg, config_name=a.config, world_size=a.nodes * a.nproc_per_node)
        script = render_sbatch(
            config=a.config,
            nodes=a.nodes,
            nproc_per_node=a.nproc_per_node,
            gpus_per_node=a.nproc_per_node if a.gpus_per_node is None else a.gpus_per_node,
            cpus_per_node=8 * a.nproc_per_node if a.cpus_per_node is None else a.cpus_per_node,
            time=a.time,
            partition=a.partition,
            output_dir=a.output_dir,
            save_every_n_steps=a.save_every_n_steps,
            python_env=a.python_env,
            overrides=a.overrides,
            args=shlex.join(argv),
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: --nodes {a.nodes} x --nproc-per-node {a.nproc_per_node}: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(script)
    return 0
