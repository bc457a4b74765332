"""Misspelt command-line keys of plugin configs stop the run at start, with the closest valid key."""

import dataclasses
import importlib.util
import inspect
import sys
import time
from pathlib import Path

import datasets
import pytest
from omegaconf import OmegaConf
from torchtune.config._parse import TuneRecipeArgumentParser
from torchtune.config._utils import _merge_yaml_and_cli_args
from torchtune_mistral3 import _registry
from torchtune_mistral3.finetune import _full as full_recipe
from torchtune_mistral3.training import _parallel_dims, check_cli_keys, stock_recipe_path
from torchtune_mistral3.training._config_keys import cli_overrides, recipe_keys

DEMO = _registry.CONFIGS_DIR / "mistral3p5_medpix_demo.yaml"
RECIPE_SCRIPT = _registry.RECIPES_DIR / "full_finetune_distributed.py"
RECIPE = Path(full_recipe.__file__)
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
        ["batch_size=2", "optimizer.lr=1e-3", "dataset.split=train", "dataset.packed=True"],
        ["dataset=torchtune_mistral3.datasets.medpix_dataset", "dataset.source=parquet", "dataset.data_files=x"],
        ["model.vision_trainable=True", "model.max_seq_len=256", "dataset.columns=[a]", "dataset.name=x"],
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
    keys = recipe_keys([RECIPE, Path(_parallel_dims.__file__), stock_recipe_path("full_finetune_distributed")])
    assert {"pipeline_parallel_dim", "save_every_n_steps", "batch_size", "clip_grad_norm", "profiler"} <= keys


def test_cli_overrides_are_what_torchtune_merges():
    argv = ["--config", str(DEMO), "a=1", "b.c=2", "~d", "e=x=y"]
    assert cli_overrides(argv) == ["a", "b.c", "e"]


def test_stock_configs_keep_stock_behaviour(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("plugin_recipe", RECIPE_SCRIPT)
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


LORA_DEMO = _registry.CONFIGS_DIR / "mistral3p5_medpix_lora_demo.yaml"


@pytest.mark.parametrize(
    "config, override, message",
    [
        # medpix_dataset(**load_dataset_kwargs) hands the key to datasets.load_dataset, which fails after the model
        (DEMO, "dataset.packd=True", "dataset.packd (did you mean dataset.packed?)"),
        # mistral3_from_hf_config(**kwargs) -> mistral3(...), which has no such argument
        (DEMO, "model.vision_trainabl=false", "model.vision_trainabl (did you mean model.vision_trainable?)"),
        # mistral3_lora_from_hf_config -> _build_lora(mistral3, ...) -> builder(**model_kwargs)
        (LORA_DEMO, "model.lora_rnk=4", "model.lora_rnk (did you mean model.lora_rank?)"),
        # medpix_sample_dataset sets source itself: say which component takes it
        (
            DEMO,
            "dataset.source=parquet",
            "sets source itself; to choose it, use the component it calls: "
            "dataset=torchtune_mistral3.datasets.medpix_dataset dataset.source=...",
        ),
    ],
)
def test_keys_passed_through_kwargs_are_checked_against_the_callee(config, override, message):
    with pytest.raises(ValueError, match="Unknown config key") as info:
        _check(override, config=config)
    assert message in str(info.value)


def test_keyword_arguments_follow_kwargs_to_the_callee():
    from torchtune_mistral3.checkpointing import mistral3_from_hf_config
    from torchtune_mistral3.datasets import medpix_dataset, medpix_sample_dataset
    from torchtune_mistral3.models.mistral3 import mistral3
    from torchtune_mistral3.training._config_keys import _keywords

    # the builder's own arguments, plus its callee's, less what it sets itself (reference: the signatures)
    own = set(inspect.signature(mistral3_from_hf_config).parameters) - {"kwargs"}
    assert _keywords(mistral3_from_hf_config) == own | set(inspect.signature(mistral3).parameters)
    sample = _keywords(medpix_sample_dataset)
    full = _keywords(medpix_dataset)
    assert full - sample == {"source", "data_files"} and "load_dataset_kwargs" not in full
    # load_dataset's own arguments and a parquet builder config's fields (datasets' dataclass)
    from datasets.packaged_modules.parquet.parquet import ParquetConfig

    # (path is the source, given positionally)
    assert set(inspect.signature(datasets.load_dataset).parameters) - {"config_kwargs", "path"} <= full
    assert {f.name for f in dataclasses.fields(ParquetConfig)} <= full


@pytest.mark.parametrize(
    "values, message",
    [
        ({"epochs": 0}, "epochs=0 (the passes over the training data) must be a positive integer."),
        ({"max_steps_per_epoch": 0}, "max_steps_per_epoch=0 (optimizer steps per epoch (null: the whole epoch)) "
                                     "must be a positive integer or null"),
        ({"run_val_every_n_steps": -1}, "run_val_every_n_steps=-1"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": True}, "batch_size=True"),
        ({"optimizer": {"lr": "fast"}}, "optimizer.lr='fast' (the learning rate) must be a positive number"),
        ({"optimizer": {"lr": -1e-3}}, "optimizer.lr=-0.001"),
        ({"tensor_parallel_dim": 0}, "tensor_parallel_dim=0"),
    ],
)
def test_wrong_values_are_refused_naming_the_key(values, message):
    from torchtune_mistral3.training import check_config_values

    cfg = OmegaConf.merge(OmegaConf.load(DEMO), values)
    with pytest.raises(ValueError, match="Invalid config value") as info:
        check_config_values(cfg)
    assert message in str(info.value)


def test_shipped_configs_have_valid_values():
    from torchtune_mistral3.eval._recipe import EVAL_COUNTS
    from torchtune_mistral3.training import check_config_values

    for path in sorted(_registry.CONFIGS_DIR.glob("*.yaml")):
        cfg = OmegaConf.load(path)
        check_config_values(cfg, counts=EVAL_COUNTS) if "eval" in path.name else check_config_values(cfg)
    # null turns validation and step saves off, and lets an epoch run to its end
    check_config_values(OmegaConf.create({"run_val_every_n_steps": None, "max_steps_per_epoch": None}))


# refusals that must come at start, before a model is built (each as `tune run` prints it)
@pytest.mark.parametrize(
    "recipe, config, overrides, messages",
    [
        (
            "full_finetune_distributed",
            "mistral3p5_medpix_demo",
            ["epochs=0", "max_steps_per_epoch=0", "run_val_every_n_steps=-1", "optimizer.lr=fast",
             "gradient_accumulation_steps=0", "batch_size=0"],
            ["epochs=0", "max_steps_per_epoch=0", "run_val_every_n_steps=-1", "optimizer.lr='fast'",
             "gradient_accumulation_steps=0", "batch_size=0"],
        ),
        (
            "full_finetune_distributed",
            "mistral3p5_medpix_demo",
            ["dataset.packd=True", "model.vision_trainabl=false", "dataset.source=parquet"],
            ["dataset.packd (did you mean dataset.packed?)", "model.vision_trainabl (did you mean",
             "dataset=torchtune_mistral3.datasets.medpix_dataset"],
        ),
        ("lora_finetune_distributed", "mistral3p5_medpix_lora_demo", ["gradient_accumulation_steps=0"],
         ["gradient_accumulation_steps=0"]),
        ("medpix_eval", "mistral3p5_medpix_demo_eval", ["max_row=3"], ["max_row (did you mean max_rows?)"]),
        ("medpix_eval", "mistral3p5_medpix_demo_eval", ["max_new_tokens=0"], ["max_new_tokens=0"]),
    ],
)
def test_refusals_come_at_start_through_tune_run(tune, tmp_path, recipe, config, overrides, messages):
    out = tmp_path / "out"
    start = time.perf_counter()
    proc = tune("run", recipe, "--config", config, f"output_dir={out}", *overrides, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: "), proc.stderr[-2000:]
    for message in messages:
        assert message in last, last
    assert not out.exists() and "Instantiating" not in proc.stderr and "Model is initialized" not in proc.stderr
    assert time.perf_counter() - start < 120
