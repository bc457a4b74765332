"""torchtune's ``lora_finetune_single_device``, extended by torchtune-mistral3.

Plugin configs run :class:`~torchtune_mistral3.finetune.Mistral3LoRAFinetuneRecipe` in one process; others stock.
"""

import os
import sys

from omegaconf import DictConfig
from torchtune import config
from torchtune_mistral3._entry import is_plugin_config, run_recipe
from torchtune_mistral3.finetune import Mistral3LoRAFinetuneRecipe
from torchtune_mistral3.training import load_stock_recipe

stock = load_stock_recipe("lora_finetune_single_device")


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: plugin configs run the plugin's LoRA recipe in one process, other configs the stock one.

    Args:
        cfg (DictConfig): the parsed config (YAML plus command-line overrides).

    Raises:
        ValueError: if a plugin config is launched on more than one process (use ``lora_finetune_distributed``).
    """
    if is_plugin_config(cfg) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "lora_finetune_single_device runs one process; launch several with "
            "`tune run --nproc_per_node N lora_finetune_distributed --config ...`"
        )
    return run_recipe(cfg, Mistral3LoRAFinetuneRecipe, lambda recipe: recipe.train(), stock_main=stock.recipe_main)


if __name__ == "__main__":
    sys.exit(recipe_main())
