from ._script import render_sbatch, sbatch_template

__all__ = ["render_sbatch", "sbatch_template"]
