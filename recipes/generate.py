"""torchtune's ``generate``, extended by torchtune-mistral3.

The plugin routes the stock recipe name here. Configs whose model comes from ``torchtune_mistral3`` run
:class:`~torchtune_mistral3.generation.Mistral3GenerationRecipe` (an image + question prompt, greedy or sampled,
with a KV cache; its docstring lists the keys); every other config runs the stock recipe unchanged.

    tune run generate --config mistral3p5_medpix_demo_generation
"""

import sys

from omegaconf import DictConfig
from torchtune import config
from torchtune_mistral3._entry import run_recipe
from torchtune_mistral3.generation import Mistral3GenerationRecipe
from torchtune_mistral3.training import load_stock_recipe

stock = load_stock_recipe("generate")


@config.parse
def main(cfg: DictConfig) -> None:
    """Entry point: plugin configs run the plugin's generation, every other config the stock recipe.

    Args:
        cfg (DictConfig): the parsed config (YAML plus command-line overrides).
    """
    return run_recipe(cfg, Mistral3GenerationRecipe, lambda recipe: recipe.generate(cfg), stock_main=stock.main,
                      check_keys=False)


if __name__ == "__main__":
    sys.exit(main())
