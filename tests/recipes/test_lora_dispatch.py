"""The LoRA recipe names: plugin configs run the plugin's LoRA recipe, every other config torchtune's own recipe."""

import importlib.util
import sys

import pytest
from omegaconf import OmegaConf
from torchtune_mistral3 import _entry, _registry

COMPONENTS = ("torchtune.models.llama3_2.lora_llama3_2_1b", "torchtune_mistral3.models.mistral3.mistral3_lora")


def _recipe_module(name):
    spec = importlib.util.spec_from_file_location(f"plugin_{name}", _registry.RECIPES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_with(monkeypatch, tmp_path, recipe):
    for component in COMPONENTS:
        path = tmp_path / "c.yaml"
        path.write_text(OmegaConf.to_yaml({"model": {"_component_": component}}))
        monkeypatch.setattr(sys, "argv", ["recipe", "--config", str(path)])
        with pytest.raises(SystemExit):  # torchtune's config.parse exits with the recipe's return value
            recipe.recipe_main()


@pytest.mark.parametrize("name", ["lora_finetune_distributed", "lora_finetune_single_device"])
def test_stock_configs_go_to_the_stock_lora_recipe_and_plugin_configs_to_the_plugin(monkeypatch, tmp_path, name):
    recipe = _recipe_module(name)
    calls = []
    monkeypatch.setattr(recipe.stock.recipe_main, "__wrapped__", lambda cfg: calls.append(("stock", cfg)))

    class Fake:
        def __init__(self, cfg):
            calls.append(("plugin", cfg))

        def setup(self, cfg):
            pass

        def train(self):
            pass

        def cleanup(self):
            pass

    monkeypatch.setattr(recipe, "Mistral3LoRAFinetuneRecipe", Fake)
    monkeypatch.setattr(recipe.config, "log_config", lambda **kw: None)
    monkeypatch.setattr(_entry, "ensure_single_process_env", lambda: None)
    _run_with(monkeypatch, tmp_path, recipe)
    assert [c[0] for c in calls] == ["stock", "plugin"]
    assert recipe.stock.__file__.endswith(f"recipes/{name}.py") and "-packages" in recipe.stock.__file__


def test_single_device_refuses_several_processes(monkeypatch, tmp_path):
    recipe = _recipe_module("lora_finetune_single_device")
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = tmp_path / "c.yaml"
    path.write_text(OmegaConf.to_yaml({"model": {"_component_": COMPONENTS[1]}}))
    monkeypatch.setattr(sys, "argv", ["recipe", "--config", str(path)])
    with pytest.raises(ValueError, match="lora_finetune_distributed"):
        recipe.recipe_main()
