"""``python -m torchtune_mistral3.rehearse --config NAME [--world-size N] [--ranks R,..] [--json] [key=value ...]``.

Exit status: 0 when every rank played fits ``plan.gpu_gib`` (default 80), 1 when one does not, 2 when the
launch fails (the message names the rank, and the key and file where a checkpoint read fails).
"""

import argparse
import sys
from typing import List, Optional

from torchtune_mistral3.rehearse._rehearse import RehearsalError, rehearse
from torchtune_mistral3.rehearse._report import format_rehearsal, rehearsal_to_json
from torchtune_mistral3.training._parallel_dims import ParallelDims


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry point; see the module docstring.

    Args:
        argv (Optional[List[str]]): arguments; None for ``sys.argv[1:]``. Default is None.

    Returns:
        int: the exit status.
    """
    from torchtune_mistral3.planning import PLAN_KEY_FILES, load_config

    parser = argparse.ArgumentParser(prog="python -m torchtune_mistral3.rehearse",
                                     description="Rehearse a config's multi-GPU launch on one CPU machine.")
    parser.add_argument("--config", required=True, help="registered config name or YAML path")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks of the job (nnodes x nproc_per_node); default TP x PP")
    parser.add_argument("--ranks", default=None,
                        help="comma-separated ranks to play, or 'all'; default one per pipeline rank (dp 0, tp 0)")
    parser.add_argument("--recipe", default=None, choices=["full_finetune_distributed", "lora_finetune_distributed"],
                        help="default: the LoRA recipe for a LoRA model builder")
    parser.add_argument("--setup-only", action="store_true",
                        help="pre-flight of the checkpoint: setup only (reads planned and checked), no step or save")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the report")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (recipe keys, plan.*, rehearse.*)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, key_files=PLAN_KEY_FILES)  # plan.* keys
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    ranks = None
    if args.ranks == "all":
        ranks = list(range(args.world_size or ParallelDims.from_config(cfg).world_size))
    elif args.ranks:
        ranks = [int(r) for r in args.ranks.split(",")]
    try:
        result = rehearse(cfg, args.config, world_size=args.world_size, ranks=ranks, recipe=args.recipe,
                          setup_only=args.setup_only)
    except RehearsalError as e:
        print(f"rehearsal failed: {e}", file=sys.stderr)
        return 2
    print(rehearsal_to_json(result) if args.json else format_rehearsal(result))
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
