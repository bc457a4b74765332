"""Adds this plugin's configs to torchtune's recipe registry and routes its recipe name to the plugin recipe.

Called through the ``torchtune.plugins`` entry point (see ``_bootstrap.py``) right after
``torchtune._recipe_registry`` is imported. The registry's ``Recipe`` and ``Config`` objects are mutated in
place, so every ``tune`` subcommand (``ls``, ``cp``, ``cat``, ``validate``, ``run``) sees the change whatever
name it imported. The CLI joins ``<torchtune root>/recipes[/configs]`` with the registered path; an absolute
path wins that join, which is how files inside this package are found.
"""

import json
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def _shipped_dir(name: str) -> Path:
    """``recipes``/``configs`` live inside the wheel, or at the repository root in a source checkout."""
    installed = _PACKAGE_DIR / name
    return installed if installed.is_dir() else _PACKAGE_DIR.parent.parent / name


CONFIGS_DIR = _shipped_dir("configs")
RECIPES_DIR = _shipped_dir("recipes")
MANIFEST = CONFIGS_DIR / "manifest.json"


def register() -> None:
    """Register the plugin's configs and recipes with torchtune's registry (idempotent).

    Raises:
        ValueError: if the manifest names a recipe torchtune does not know.
    """
    from torchtune import _recipe_registry as registry

    manifest = json.loads(MANIFEST.read_text())
    _add_new_recipes(registry, manifest.get("new_recipes", {}))
    recipes = {r.name: r for r in registry.get_all_recipes()}
    for name, recipe_file in manifest["recipes"].items():
        if name not in recipes:
            raise ValueError(f"{MANIFEST}: recipe '{name}' is not one of torchtune's recipes")
        recipes[name].file_path = str(RECIPES_DIR / recipe_file)
    for entry in manifest["configs"]:
        recipe = recipes.get(entry["recipe"])
        if recipe is None:
            raise ValueError(f"{MANIFEST}: config '{entry['name']}' names unknown recipe '{entry['recipe']}'")
        if any(c.name == entry["name"] for c in recipe.configs):
            continue
        recipe.configs.append(registry.Config(name=entry["name"], file_path=str(CONFIGS_DIR / entry["file"])))
    _let_validate_take_names()


def _add_new_recipes(registry, new_recipes: dict) -> None:
    """Add the plugin's own recipes (names torchtune does not have, e.g. ``medpix_eval``) to the registry."""
    known = {r.name for r in registry.get_all_recipes()}
    for name, entry in new_recipes.items():
        if name in known:
            continue
        registry._ALL_RECIPES.append(
            registry.Recipe(
                name=name,
                file_path=str(RECIPES_DIR / entry["file"]),
                configs=[],
                supports_distributed=bool(entry.get("supports_distributed", True)),
            )
        )


def _let_validate_take_names() -> None:
    """``tune validate`` takes only a path in torchtune 0.6.1; let it take a registered config name too."""
    from torchtune._cli import validate

    original = validate.Validate._validate_cmd
    if getattr(original, "resolves_names", False):
        return

    def _validate_cmd(self, args):
        if not args.config.exists():
            from torchtune._cli.cp import ROOT
            from torchtune._recipe_registry import get_all_recipes

            for recipe in get_all_recipes():
                for cfg in recipe.configs:
                    if cfg.name == str(args.config):
                        args.config = ROOT / "recipes" / "configs" / cfg.file_path
        return original(self, args)

    _validate_cmd.resolves_names = True
    validate.Validate._validate_cmd = _validate_cmd
