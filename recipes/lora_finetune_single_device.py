"""torchtune's ``lora_finetune_single_device``, extended by torchtune-mistral3.

Configs whose model comes from ``torchtune_mistral3`` run the plugin's LoRA recipe
(``lora_finetune_distributed.py``, :class:`Mistral3LoRAFinetuneRecipe`) in this one process; every other config
runs the stock single-device recipe unchanged.
"""

import os
import sys

from omegaconf import DictConfig
from torchtune import config
from torchtune_mistral3.training import load_plugin_recipe, load_stock_recipe

lora = load_plugin_recipe("lora_finetune_distributed")
stock = load_stock_recipe("lora_finetune_single_device")


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: plugin configs run the plugin's LoRA recipe in one process, other configs the stock one.

    Args:
        cfg (DictConfig): the parsed config (YAML plus command-line overrides).

    Raises:
        ValueError: if a plugin config is launched on more than one process (use ``lora_finetune_distributed``).
    """
    if not lora.full.is_plugin_config(cfg):
        return stock.recipe_main.__wrapped__(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "lora_finetune_single_device runs one process; launch several with "
            "`tune run --nproc_per_node N lora_finetune_distributed --config ...`"
        )
    return lora.recipe_main.__wrapped__(cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
