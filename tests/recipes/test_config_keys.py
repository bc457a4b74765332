"""Misspelt command-line keys of plugin configs stop the run at start, with the closest valid key."""

import importlib.util
import sys
import time

import pytest
from omegaconf import OmegaConf
from torchtune.config._parse import TuneRecipeArgumentParser
from torchtune.config._utils import _merge_yaml_and_cli_args
from torchtune_mistral3 import _registry
from torchtune_mistral3.training import check_cli_keys, stock_recipe_path
from torchtune_mistral3.training._config_keys import cli_overrides, recipe_keys

DEMO = _registry.CONFIGS_DIR / "mistral3p5_medpix_demo.yaml"
RECIPE = _registry.RECIPES_DIR / "full_finetune_distributed.py"
RECIPE_FILES = (str(RECIPE), str(stock_recipe_path("full_finetune_distributed")))


def _check(*overrides, config=DEMO):
    argv = ["--config", str(config), *overrides]
    yaml_args, cli_args = TuneRecipeArgumentParser(add_help=False).parse_known_args(argv)
    check_cli_keys(_merge_yaml_and_cli_args(yaml_args, cli_args), argv, RECIPE_FILES)


def test_misspelt_key_fails_at_start_through_tune_run(tune, tmp_path):
    out = tmp_path / "out"
    start = time.perf_counter()
    proc = tune(
        "run",
        "full_finetune_distributed",
        "--config",
        "mistral3p5_medpix_demo",
        f"output_dir={out}",
        "batchsize=2",
        check=False,
    )
    assert proc.returncode == 1
    assert "Unknown config key(s) on the command line: batchsize (did you mean batch_size?)" in proc.stderr
    assert "allow_new_keys=[key]" in proc.stderr
    # nothing was built: no process group, no demo checkpoint, no logs
    assert not out.exists() and "Instantiating the model" not in proc.stderr
    assert time.perf_counter() - start < 120


# every override the other tests pass to `tune run` (tests/recipes/*), and component arguments
@pytest.mark.parametrize(
    "overrides",
    [
        ["batch_size=2", "optimizer.lr=1e-3", "dataset.source=parquet", "dataset.split=train"],
        ["output_dir=/tmp/x", "checkpoint_dir=/tmp/y", "prepare_checkpoint=null", "checkpointer.save_dtype=fp32"],
        ["max_steps_per_epoch=2", "gradient_accumulation_steps=2", "clip_grad_norm=0.5", "shuffle=False", "dtype=fp32"],
        ["pipeline_parallel_dim=2", "pipeline_microbatches=2", "pipeline_schedule=GPipe", "tensor_parallel_dim=2"],
        [
            "save_every_n_steps=1",
            "run_val_every_n_steps=null",
            "resume_from_checkpoint=True",
            "tokenizer.max_seq_len=256",
        ],
        [
            "optimizer=torch.optim.SGD",
            "optimizer.momentum=0.9",
            "profiler.enabled=True",
            "metric_logger.log_dir=/tmp/l",
        ],
        ["lr_scheduler.num_warmup_steps=1", "max_val_steps=1", "batch_size_val=1", "compile=False"],
        ["my_new_key=1", "allow_new_keys=[my_new_key]"],
        ["tensor_parallel_plan.sequence_parallel=True", "tensor_parallel_async=False"],
    ],
)
def test_valid_overrides_pass(overrides):
    _check(*overrides)


@pytest.mark.parametrize(
    "override, message",
    [
        ("batchsize=2", "batchsize (did you mean batch_size?)"),
        ("optimizer.lrr=1", "optimizer.lrr (did you mean optimizer.lr?)"),
        ("tokenizer.max_seq_length=9", "tokenizer.max_seq_length (did you mean tokenizer.max_seq_len?)"),
        ("checkpointer.checkpoint_dirr=/x", "checkpointer.checkpoint_dirr (did you mean checkpointer.checkpoint_dir?)"),
        ("pipeline_paralel_dim=2", "pipeline_paralel_dim (did you mean pipeline_parallel_dim?)"),
        ("run_val_every_n_step=2", "run_val_every_n_step (did you mean run_val_every_n_steps?)"),
    ],
)
def test_unknown_keys_are_refused_with_the_closest_key(override, message):
    with pytest.raises(ValueError, match="Unknown config key") as info:
        _check(override)
    assert message in str(info.value)


def test_component_swapped_on_the_command_line_is_checked_against_the_new_component():
    _check("optimizer=torch.optim.SGD", "optimizer.momentum=0.9")
    with pytest.raises(ValueError, match="optimizer.betas"):
        _check("optimizer=torch.optim.SGD", "optimizer.betas=[0.9,0.9]")


def test_recipe_keys_are_read_from_the_source(tmp_path):
    source = tmp_path / "recipe.py"
    source.write_text(
        "from torchtune.training import PROFILER_KEY\nKEY = 'from_constant'\n"
        "class R:\n    def __init__(self, cfg):\n"
        "        a = cfg.get('from_get', 1); b = cfg['from_item']; c = cfg.from_attr.get('nested')\n"
        "        d = self._cfg.get('from_self'); e = cfg.get(KEY); f = cfg.get(PROFILER_KEY)\n"
        "        other.get('not_cfg'); cfg.items()\n"
    )
    assert recipe_keys([source]) == {
        "from_get",
        "from_item",
        "from_attr",
        "from_attr.nested",
        "from_self",
        "from_constant",
        "profiler",
    }
    # a key added to the plugin recipe by another change is known without editing a list
    keys = recipe_keys([RECIPE, stock_recipe_path("full_finetune_distributed")])
    assert {"pipeline_parallel_dim", "save_every_n_steps", "batch_size", "clip_grad_norm", "profiler"} <= keys


def test_cli_overrides_are_what_torchtune_merges():
    argv = ["--config", str(DEMO), "a=1", "b.c=2", "~d", "e=x=y"]
    assert cli_overrides(argv) == ["a", "b.c", "e"]


def test_stock_configs_keep_stock_behaviour(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("plugin_recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    seen = []
    monkeypatch.setattr(recipe.stock.recipe_main, "__wrapped__", lambda cfg: seen.append(cfg))
    path = tmp_path / "c.yaml"
    path.write_text(OmegaConf.to_yaml({"model": {"_component_": "torchtune.models.llama3_2.llama3_2_1b"}}))
    monkeypatch.setattr(sys, "argv", ["recipe", "--config", str(path), "batchsize=2"])
    with pytest.raises(SystemExit):
        recipe.recipe_main()
    assert seen[0].batchsize == 2
