"""Configs that are not the plugin's run torchtune's stock recipe, untouched."""

import importlib.util
import sys

from omegaconf import OmegaConf
from torchtune_mistral3 import _registry


def _recipe_module():
    path = _registry.RECIPES_DIR / "full_finetune_distributed.py"
    spec = importlib.util.spec_from_file_location("plugin_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stock_configs_go_to_the_stock_recipe_and_plugin_configs_to_the_plugin(monkeypatch, tmp_path):
    recipe = _recipe_module()
    calls = []
    monkeypatch.setattr(recipe.stock.recipe_main, "__wrapped__", lambda cfg: calls.append(("stock", cfg.model)))

    class Fake:
        def __init__(self, cfg):
            calls.append(("plugin", cfg.model))

        def setup(self, cfg):
            pass

        def train(self):
            pass

        def cleanup(self):
            pass

    monkeypatch.setattr(recipe, "Mistral3FullFinetuneRecipe", Fake)
    monkeypatch.setattr(recipe.config, "log_config", lambda **kw: None)
    for component in ("torchtune.models.llama3_2.llama3_2_1b", "torchtune_mistral3.models.mistral3.mistral3p5_128b"):
        path = tmp_path / "c.yaml"
        path.write_text(OmegaConf.to_yaml({"model": {"_component_": component}}))
        monkeypatch.setattr(sys, "argv", ["recipe", "--config", str(path)])
        try:
            recipe.recipe_main()
        except SystemExit:
            pass
    assert [c[0] for c in calls] == ["stock", "plugin"]
    assert calls[0][1]["_component_"] == "torchtune.models.llama3_2.llama3_2_1b"
    # the stock recipe is torchtune's own class, not a copy
    assert recipe.stock.__file__.endswith("recipes/full_finetune_distributed.py")
    assert "site-packages" in recipe.stock.__file__ or "dist-packages" in recipe.stock.__file__
