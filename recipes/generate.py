"""torchtune's ``generate``, extended by torchtune-mistral3.

The plugin routes the stock recipe name here. Configs whose model comes from ``torchtune_mistral3`` run
:class:`~torchtune_mistral3.generation.Mistral3GenerationRecipe`; every other config runs the stock recipe
unchanged.

What it adds to the stock recipe, for plugin configs:

- an image + question prompt (``prompt.user: {image: <path or URL>, text: <question>}``) or text only,
  from the config or the command line (``prompt.user.image=... prompt.user.text=...``);
- greedy decoding (``greedy: True``) or sampling (``greedy=False temperature=0.7 top_k=50``);
- a KV cache (``enable_kv_cache``) in the plugin's ``generate`` (prefill, then one token per decode step; only the
  last position reaches the vocabulary head); the vision tower runs once per image;
- the plugin's lazy FP8-aware checkpointer; CPU runs.

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
