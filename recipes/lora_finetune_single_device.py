"""torchtune's ``lora_finetune_single_device``, extended by torchtune-mistral3.

Configs whose model comes from ``torchtune_mistral3`` run the plugin's LoRA recipe
(``lora_finetune_distributed.py``, :class:`Mistral3LoRAFinetuneRecipe`) in this one process; every other config
runs the stock single-device recipe unchanged.
"""

import importlib.util
import os
import sys
from pathlib import Path

from omegaconf import DictConfig
from torchtune import config
from torchtune_mistral3.training import load_stock_recipe


def _plugin_recipe(name: str):
    """Import one of the plugin's recipe scripts (next to this file) as a module."""
    module_name = f"torchtune_mistral3_recipes.{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, Path(__file__).resolve().parent / f"{name}.py")
        sys.modules[module_name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[module_name])
    return sys.modules[module_name]


lora = _plugin_recipe("lora_finetune_distributed")
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
