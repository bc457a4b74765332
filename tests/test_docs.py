"""Figures and lists the docs quote, recomputed from the code, the configs and the shipped results."""

import importlib.util
import re

import pytest
from omegaconf import OmegaConf
from torchtune_mistral3 import _registry

from tests.conftest import REPO


def _doc_figures():
    spec = importlib.util.spec_from_file_location("doc_figures", REPO / "scripts" / "doc_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _text(path: str) -> str:
    return re.sub(r"\s+", " ", (REPO / path).read_text())  # line breaks inside a sentence do not matter


def test_readme_names_the_configs_that_pack():
    packed = sorted(
        p.stem for p in _registry.CONFIGS_DIR.glob("*.yaml")
        if (OmegaConf.load(p).get("dataset", None) or {}).get("packed", False) is True
    )
    assert packed == ["ministral3_14b_medpix", "ministral3_8b_medpix", "mistral3p5_medpix"]
    sentence = re.search(r"Packed batches \(.*?\): `docs/data.md`", _text("README.md"))[0]
    assert "on in the shipped" in sentence and "off in the shipped" not in sentence
    assert set(re.findall(r"`(\w+_medpix)`", sentence)) == set(packed)


def test_cluster_disk_sizes_follow_from_the_parameter_count():
    sizes = _doc_figures().training_state_sizes()
    text = _text("docs/cluster.md")
    assert f"the model's {sizes['params_b']:.2f} B parameters in BF16" in text
    assert f"about {sizes['export_gb']:.0f} GB" in text
    assert f"about {sizes['state_tb']:.2f} TB; the two newest states are kept" in text
    assert f"Size `output_dir` for about {sizes['output_dir_tb']:.2f} TB" in text


def test_parallelism_doc_lists_the_layouts_tune_run_checks():
    spec = importlib.util.spec_from_file_location("layouts", REPO / "tests/recipes/test_tune_run_parallel_layouts.py")
    layouts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layouts)
    text = _text("docs/parallelism.md")
    paragraph = re.search(r"for these layouts \(the test's `UNPACKED`\):(.*?)Neither GPipe", text)[1]
    assert re.findall(r"`(\w+)` \(", paragraph) == layouts.UNPACKED
    assert not any("gpipe" in " ".join(o).lower() for _, o in layouts.LAYOUTS.values())  # so the doc says so
    assert "tp2" not in layouts.UNPACKED
    for doc in ("docs/parallelism.md", "docs/numbers.md"):
        assert "PP 2 with GPipe" not in _text(doc) and "(1F1B, GPipe," not in _text(doc)


def test_performance_memory_table_is_what_the_planner_predicts():
    rows = _doc_figures().memory_check_rows()
    text = (REPO / "docs/performance.md").read_text()
    table = re.search(r"\| file \| slice, batch \|.*?\n\n", text, re.S)[0]
    assert table.strip().splitlines()[2:] == rows
    assert f"{len(rows)} variants of 1 file" in re.sub(r"\s+", " ", text)
    errors = [row.split("|")[-2].strip() for row in rows]
    docstring = _text("plugin/torchtune_mistral3/planning/_memory_plan.py")
    assert f"peaks are {errors[0]} (compiled, one loss chunk) and {errors[1]} (eager, 8 chunks)" in docstring


def test_lora_configs_quote_the_measured_scaled_mm_speedup():
    speedup = f"{_doc_figures().lora_scaled_mm_speedup():.2f}x"
    for name in ("ministral3_3b_medpix_lora", "mistral3p5_medpix_lora", "mistral3p5_medpix_lora_demo"):
        text = (_registry.CONFIGS_DIR / f"{name}.yaml").read_text()
        assert "not measured yet" not in text
        assert f"scaled_mm: {speedup} faster on one H200" in text
    assert f"{speedup} `dequantize`" in _text("docs/lora.md")


@pytest.mark.integration
def test_parallelism_doc_quotes_the_demo_run(tmp_path):
    figures = _doc_figures()
    figures.tune_run("full_finetune_distributed", "--config", "mistral3p5_medpix_demo", f"output_dir={tmp_path}",
                     *figures.DEMO_STEPS)
    assert figures.demo_losses_line(tmp_path) in _text("docs/parallelism.md")
    assert " ".join(figures.DEMO_STEPS) in _text("docs/parallelism.md")
