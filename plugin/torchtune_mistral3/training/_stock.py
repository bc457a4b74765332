"""Access to the stock torchtune recipe scripts, which torchtune deliberately keeps out of the import system."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def stock_recipe_path(name: str) -> Path:
    """Path of a recipe script shipped by torchtune (``<site-packages>/recipes/<name>.py``).

    Args:
        name (str): recipe name, e.g. ``"full_finetune_distributed"``.

    Returns:
        Path: the script's path.
    """
    import torchtune

    return Path(torchtune.__file__).resolve().parent.parent / "recipes" / f"{name}.py"


def load_stock_recipe(name: str) -> ModuleType:
    """Import a stock torchtune recipe script as a module so that its recipe class can be subclassed.

    Args:
        name (str): recipe name, e.g. ``"full_finetune_distributed"``.

    Returns:
        ModuleType: the executed recipe module (cached under ``torchtune_stock_recipes.<name>``).
    """
    module_name = f"torchtune_stock_recipes.{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, stock_recipe_path(name))
        sys.modules[module_name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[module_name])
    return sys.modules[module_name]
