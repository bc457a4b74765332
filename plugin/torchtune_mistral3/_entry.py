"""The one ``recipe_main`` of the plugin's recipe scripts: the plugin's recipe class, or torchtune's stock recipe.

A config whose model comes from this plugin runs the plugin's recipe class; any other config runs torchtune's stock
recipe, untouched. ``_registry.py`` routes the stock recipe names to the scripts under ``recipes/``; each script calls
:func:`run_recipe` with its recipe class, the step that runs it, and the stock entry point it stands in for.
"""

import inspect
import sys
from typing import Any, Callable, Mapping, Optional

from omegaconf import DictConfig
from torchtune import config

from .training import check_cli_keys, distributed_timeout, ensure_single_process_env, explain_collective_timeouts

PLUGIN_PACKAGE = "torchtune_mistral3"


def is_plugin_config(cfg: Mapping[str, Any]) -> bool:
    """True when the config's model comes from this plugin (those configs run the plugin's recipes).

    Args:
        cfg (Mapping[str, Any]): the parsed config.

    Returns:
        bool: whether ``model._component_`` is in ``torchtune_mistral3``.
    """
    return str(cfg.get("model", {}).get("_component_", "")).startswith(PLUGIN_PACKAGE + ".")


def run_recipe(
    cfg: DictConfig,
    recipe_cls: type,
    run: Callable[[Any], Any],
    *,
    stock_main: Optional[Callable[..., Any]] = None,
    check_keys: bool = True,
) -> Any:
    """Run a plugin config with ``recipe_cls``, any other config with the stock recipe's entry point.

    A plugin config: its command-line keys are checked against what the recipe reads (``check_keys``), the config
    is logged, then the recipe is built, set up, run and cleaned up; a collective that times out on the way is
    re-raised naming ``distributed_timeout_s``.

    Args:
        cfg (DictConfig): the parsed config (YAML plus command-line overrides).
        recipe_cls (type): the plugin's recipe class; built as ``recipe_cls(cfg)``, then ``setup(cfg)``.
        run (Callable[[Any], Any]): runs the set-up recipe (e.g. ``lambda recipe: recipe.train()``).
        stock_main (Optional[Callable[..., Any]]): the stock recipe's ``config.parse``-wrapped entry point, for
            configs that are not the plugin's; None for a recipe torchtune does not have (every config is the
            plugin's). Default is None.
        check_keys (bool): refuse unknown command-line keys before anything is built. Default is True.

    Returns:
        Any: what the stock entry point returns, or None.
    """
    if stock_main is not None and not is_plugin_config(cfg):
        ensure_single_process_env()  # `tune run <recipe>` without torchrun flags, as for the plugin's configs
        return stock_main.__wrapped__(cfg)
    if check_keys:
        # the keys the recipe knows: what its class and its bases (stock recipe included) read from cfg
        files = [inspect.getsourcefile(c) for c in recipe_cls.__mro__ if c.__module__ not in sys.stdlib_module_names]
        check_cli_keys(cfg, sys.argv[1:], recipe_files=files)
    config.log_config(recipe_name=recipe_cls.__name__, cfg=cfg)
    with explain_collective_timeouts(distributed_timeout(cfg.get("distributed_timeout_s", None))):
        recipe = recipe_cls(cfg)
        recipe.setup(cfg)
        run(recipe)
    recipe.cleanup()
    return None
