"""`tune run medpix_eval` on a checkpoint the plugin's fine-tune saved (CPU): loss equal to training's, files."""

import json
import re

import pytest
from torchtune_mistral3.eval import PREDICTIONS_FILE, RESULTS_FILE, score_answer

pytestmark = pytest.mark.integration


def _val_loss(output_dir):
    (log,) = (output_dir / "logs").glob("*.txt")
    return float(re.search(r"Step 1 \| .*?val_loss:([-+0-9.eE]+)", log.read_text())[1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import run_tune

    out = tmp_path_factory.mktemp("train")
    run_tune(
        "run", "full_finetune_distributed", "--config", "mistral3p5_medpix_demo", f"output_dir={out}",
        "max_steps_per_epoch=1", "batch_size=1", "run_val_every_n_steps=1", "max_val_steps=null",
        "checkpointer.save_dtype=fp32",
    )
    return out


def test_eval_on_the_saved_checkpoint_gives_training_val_loss_and_every_prediction(trained, tune, tmp_path):
    out = tmp_path / "eval"
    proc = tune(
        "run", "medpix_eval", "--config", "mistral3p5_medpix_demo_eval", f"checkpoint_dir={trained / 'epoch_0'}",
        f"output_dir={out}", "batch_size=1", "max_rows=3", "batch_size_generate=2", "max_new_tokens=4",
    )
    results = json.loads((out / RESULTS_FILE).read_text())
    # the fine-tune's export carries the training transform's image size (checkpointer.max_image_size)
    exported = json.loads((trained / "epoch_0" / "preprocessor_config.json").read_text())
    assert exported["size"] == {"longest_edge": 112}
    # the validation split's 9 rows, one per batch, as the training recipe validated them after step 1
    assert results["val_loss"] == pytest.approx(_val_loss(trained), rel=1e-5)
    assert results["perplexity"] == pytest.approx(2.718281828459045 ** results["val_loss"], rel=1e-9)
    rows = [json.loads(line) for line in (out / PREDICTIONS_FILE).read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and results["rows"] == 3
    for r in rows:
        assert {k: r[k] for k in score_answer("", "")} == score_answer(r["prediction"], r["reference"])
    assert results["overall"]["n"] == 3 and set(results["by_mode"]) == {r["mode"] for r in rows}
    assert re.search(r"^\s*overall\s+3\s", proc.stdout, re.M), proc.stdout


def test_eval_without_the_fine_tuned_checkpoint_says_what_to_run(tune, tmp_path):
    proc = tune(
        "run", "medpix_eval", "--config", "mistral3p5_medpix_demo_eval", f"checkpoint_dir={tmp_path / 'none'}",
        f"output_dir={tmp_path / 'eval'}", check=False,
    )
    assert proc.returncode != 0
    assert f"Checkpoint directory '{tmp_path / 'none'}' does not exist" in proc.stderr + proc.stdout


def test_eval_over_zero_rows_is_an_error(trained, tune, tmp_path):
    # validation[:0] leaves no rows (as when every row is skipped): no loss 0.0 and perplexity 1.0
    proc = tune(
        "run", "medpix_eval", "--config", "mistral3p5_medpix_demo_eval", f"checkpoint_dir={trained / 'epoch_0'}",
        f"output_dir={tmp_path / 'eval'}", "dataset.split=validation[:0]", check=False,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "split='validation[:0]') has 0 rows to evaluate" in last, last
    assert not (tmp_path / "eval" / RESULTS_FILE).exists()


def test_eval_pointed_at_a_run_directory_suggests_its_newest_epoch(trained, tune, tmp_path):
    proc = tune(
        "run", "medpix_eval", "--config", "mistral3p5_medpix_demo_eval", f"checkpoint_dir={trained}",
        f"output_dir={tmp_path / 'eval'}", check=False,
    )
    assert proc.returncode != 0
    assert f"whose newest checkpoint is {trained / 'epoch_0'}: set checkpoint_dir={trained / 'epoch_0'}" in proc.stderr
