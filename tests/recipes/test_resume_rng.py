"""Resume restores the random state: with LoRA dropout on, the resumed steps equal the uninterrupted run's."""

import re
import shutil

import pytest

pytestmark = pytest.mark.integration

RUN = ["run", "lora_finetune_distributed", "--config", "mistral3p5_medpix_lora_demo", "batch_size=2"]
# dropout draws from torch's RNG at every step: a resume that did not restore it would draw other masks
COMMON = ["dtype=fp32", "shuffle=False", "run_val_every_n_steps=null", "max_steps_per_epoch=4",
          "save_merged_model=False", "save_every_n_steps=2", "model.lora_dropout=0.5"]


def _losses(output_dir):
    (log,) = (output_dir / "logs").glob("*.txt")
    return {int(m[1]): float(m[2]) for m in re.finditer(r"Step (\d+) \| .*?loss:([-+0-9.eE]+)", log.read_text())}


# Without the recipe keeping the data-loader iterator's seed draw off torch's RNG (Mistral3FullFinetuneRecipe._batches)
# the resumed steps draw other dropout masks (step 3: 11.729860 against 11.719451). The restore itself:
# test_training_state.py.
def test_resume_with_dropout_continues_bit_for_bit(tune, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    tune(*RUN, f"output_dir={straight}", *COMMON)
    (resumed / "training_state").mkdir(parents=True)
    shutil.copytree(straight / "training_state" / "step_2", resumed / "training_state" / "step_2")
    proc = tune(*RUN, f"output_dir={resumed}", *COMMON, "resume_from_checkpoint=True")
    assert "Resumed from" in proc.stdout + proc.stderr
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [3, 4]
    assert a[3] == b[3] and a[4] == b[4]
