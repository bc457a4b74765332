"""torchtune's ``lora_finetune_distributed``, extended by torchtune-mistral3.

Plugin configs run :class:`~torchtune_mistral3.finetune.Mistral3LoRAFinetuneRecipe`; others the stock recipe.
"""

import sys

from omegaconf import DictConfig
from torchtune import config
from torchtune_mistral3._entry import run_recipe
from torchtune_mistral3.finetune import Mistral3LoRAFinetuneRecipe
from torchtune_mistral3.training import load_stock_recipe

stock = load_stock_recipe("lora_finetune_distributed")


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: plugin configs run the extended recipe, every other config the stock one.

    Args:
        cfg (DictConfig): the parsed config (YAML plus command-line overrides).
    """
    return run_recipe(cfg, Mistral3LoRAFinetuneRecipe, lambda recipe: recipe.train(), stock_main=stock.recipe_main)


if __name__ == "__main__":
    sys.exit(recipe_main())
