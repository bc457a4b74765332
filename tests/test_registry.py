"""The plugin registers with the stock `tune` CLI through its entry point and start-up hook."""

import json
import os
import subprocess
import sys
import textwrap

from torchtune_mistral3 import _registry

MANIFEST_CONFIGS = json.loads(_registry.MANIFEST.read_text())["configs"]
PLUGIN_CONFIGS = sorted({c["name"] for c in MANIFEST_CONFIGS})


def _ls_block(lines, recipe):
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{recipe} "))
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith(" ")), len(lines))
    return "\n".join(lines[start:end])


def test_tune_ls_lists_every_plugin_config_under_its_recipe(tune):
    lines = tune("ls").stdout.splitlines()
    for entry in MANIFEST_CONFIGS:
        assert f" {entry['name']} " in _ls_block(lines, entry["recipe"]) + " ", entry
    # stock configs are still there
    assert "llama3_1/8B_full" in _ls_block(lines, "full_finetune_distributed")
    assert "llama3_2_vision/11B_lora" in _ls_block(lines, "lora_finetune_distributed")


def test_tune_cp_and_cat_resolve_plugin_configs_by_name(tune, tmp_path):
    dest = tmp_path / "copied.yaml"
    tune("cp", "mistral3p5_medpix", dest)
    assert dest.read_text() == (_registry.CONFIGS_DIR / "mistral3p5_medpix.yaml").read_text()
    cat = tune("cat", "mistral3p5_medpix").stdout
    assert "tensor_parallel_dim: 8" in cat and "pipeline_parallel_dim: 8" in cat


# `tune validate <name>` for every shipped config in ONE interpreter: the stock CLI's own parser and subcommand
# (torchtune._cli.tune.TuneCLIParser, as `tune` runs it), one config after the other; a refusal (the parser's
# error exits with code 2) is reported for its config and the loop goes on.
_VALIDATE_EACH = textwrap.dedent(
    """
    import sys
    from torchtune._cli.tune import TuneCLIParser

    for name in sys.argv[1:]:
        print(f"=== {name}", flush=True)
        sys.argv = ["tune", "validate", name]
        parser = TuneCLIParser()
        try:
            parser.run(parser.parse_args())
        except SystemExit as e:
            print(f"exit {e.code}", flush=True)
    """
)


def _validate_each(names):
    proc = subprocess.run([sys.executable, "-c", _VALIDATE_EACH, *names], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    blocks = proc.stdout.split("=== ")[1:]
    return {b.split("\n", 1)[0]: b.split("\n", 1)[1] for b in blocks}, proc.stderr


def test_tune_validate_accepts_names_for_every_shipped_config(tmp_path):
    bad = tmp_path / "bad.yaml"  # an argument the builder does not take: the loop must see it refused
    bad.write_text("tokenizer:\n  _component_: torchtune_mistral3.models.mistral3.mistral3_transform\n"
                   "  path: /nowhere/tekken.json\n  no_such_argument: 1\n")
    out, err = _validate_each([*PLUGIN_CONFIGS, str(bad)])
    assert list(out) == [*PLUGIN_CONFIGS, str(bad)]
    for name in PLUGIN_CONFIGS:
        assert out[name].strip() == "Config is well-formed!", (name, out[name], err)
    assert out[str(bad)].strip() == "exit 2" and "no_such_argument" in err


def test_the_recipe_name_runs_the_plugin_recipe():
    code = "from torchtune._recipe_registry import get_all_recipes as g; " \
        "print([r.file_path for r in g() if r.name == 'full_finetune_distributed'][0])"
    path = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert path == str(_registry.RECIPES_DIR / "full_finetune_distributed.py")


def test_a_broken_plugin_warns_and_tune_still_works(tmp_path, tune):
    # A second installed plugin whose registration raises: discovered through the same entry-point group.
    site = tmp_path / "site"
    (site / "broken_plugin").mkdir(parents=True)
    (site / "broken_plugin" / "__init__.py").write_text("def register():\n    raise RuntimeError('boom')\n")
    dist = site / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[torchtune.plugins]\nbroken = broken_plugin:register\n")
    proc = tune("ls", env={"PYTHONPATH": str(site)})
    assert "torchtune plugin 'broken' (broken_plugin:register) failed to register" in proc.stderr
    assert "RuntimeError: boom" in proc.stderr
    assert "mistral3p5_medpix" in proc.stdout and "llama3_1/8B_full" in proc.stdout


def test_register_is_idempotent():
    code = textwrap.dedent(
        """
        from torchtune import _recipe_registry as r
        from torchtune_mistral3._registry import register
        register(); register()
        names = [c.name for x in r.get_all_recipes() for c in x.configs]
        print(names.count("mistral3p5_medpix"))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
