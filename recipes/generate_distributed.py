"""torchtune's ``dev/generate_v2_distributed``, extended by torchtune-mistral3.

The plugin routes the stock recipe name here. Configs whose model comes from ``torchtune_mistral3`` run
:class:`~torchtune_mistral3.generation.Mistral3GenerationRecipe` with tensor parallelism over all launched
processes (the plugin's TP plan, each rank loading only its slice of the checkpoint; gloo on CPU, NCCL on GPU);
every other config runs the stock recipe unchanged. The keys are those of ``generate`` (see recipes/generate.py)
plus ``tensor_parallel_plan``.

    tune run --nproc_per_node 8 dev/generate_v2_distributed --config mistral3p5_medpix_generation_distributed
"""

import sys

from omegaconf import DictConfig
from torchtune import config
from torchtune_mistral3._entry import run_recipe
from torchtune_mistral3.generation import Mistral3GenerationRecipe
from torchtune_mistral3.training import load_stock_recipe

stock = load_stock_recipe("dev/generate_v2_distributed")


@config.parse
def main(cfg: DictConfig) -> None:
    """Entry point: plugin configs run the plugin's TP generation, every other config the stock recipe.

    Args:
        cfg (DictConfig): the parsed config (YAML plus command-line overrides).
    """
    return run_recipe(cfg, Mistral3GenerationRecipe, lambda recipe: recipe.generate(cfg), stock_main=stock.main,
                      check_keys=False)


if __name__ == "__main__":
    sys.exit(main())
