"""Bad checkpoints, configs, tokenizers, training states and disks through the real `tune run` (CPU, gloo).

Every run uses the demo config (see tests/recipes/test_full_finetune_distributed.py) with overrides; each case
stops at setup with a message naming the file or key, or, for a damaged training state, resumes from the
previous one.
"""

import re

import pytest

pytestmark = pytest.mark.integration

DEMO = ("full_finetune_distributed", "--config", "mistral3p5_medpix_demo")
TWO_PROCESSES = ("run", "--nproc_per_node", "2", *DEMO)


def _losses(output_dir):
    (log,) = (output_dir / "logs").glob("*.txt")
    return {int(m[1]): float(m[2]) for m in re.finditer(r"Step (\d+) \| .*?loss:([-+0-9.eE]+)", log.read_text())}


def test_damaged_newest_training_state_on_one_rank_resumes_every_rank_from_the_previous(tune, tmp_path):
    common = [
        "dtype=fp32",
        "run_val_every_n_steps=null",
        "max_steps_per_epoch=2",
        "save_every_n_steps=1",
        "batch_size=1",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    tune(*TWO_PROCESSES, f"output_dir={straight}", *common)
    states = straight / "training_state"
    assert sorted(p.name for p in states.iterdir()) == ["step_1", "step_2"]
    import shutil

    shutil.copytree(states, resumed / "training_state")
    # only rank 1's file of the newest state is cut short: rank 0 alone could read step_2
    damaged = resumed / "training_state" / "step_2" / "rank_00001.pt"
    damaged.write_bytes(damaged.read_bytes()[:4096])
    proc = tune(*TWO_PROCESSES, f"output_dir={resumed}", *common, "resume_from_checkpoint=True")
    out = proc.stdout + proc.stderr
    assert f"Skipping training state {damaged.parent}: {damaged} cannot be read" in out
    assert "its disk or a copy damaged it" in out
    assert f"Resumed from {resumed / 'training_state' / 'step_1'}: step 1" in out
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == [2] and a[2] == b[2]
