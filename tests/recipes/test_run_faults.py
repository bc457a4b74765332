"""Faults of a training run through the real `tune run` (demo config, CPU/gloo): each must stop clearly or be
handled, and never overwrite a good checkpoint or training state."""

import hashlib
import math
import re

import pytest

pytestmark = pytest.mark.integration

DEMO = ["run", "full_finetune_distributed", "--config", "mistral3p5_medpix_demo"]
DEMO_2 = ["run", "--nproc_per_node", "2", "full_finetune_distributed", "--config", "mistral3p5_medpix_demo"]
QUIET = ["run_val_every_n_steps=null", "shuffle=False"]


def _metrics(output_dir):
    """{step: {name: value}} from the run's DiskLogger file."""
    (log,) = (output_dir / "logs").glob("*.txt")
    out = {}
    for line in log.read_text().splitlines():
        m = re.match(r"Step (\d+) \| (.*)", line)
        if m:
            out.setdefault(int(m[1]), {}).update({k: float(v) for k, v in re.findall(r"(\w+):([-+0-9.eEnaif]+)", m[2])})
    return out


def _digests(output_dir):
    """sha256 of every file of the saved checkpoints and training states."""
    files = [p for d in ("epoch_0", "training_state") for p in sorted((output_dir / d).rglob("*")) if p.is_file()]
    return {str(p.relative_to(output_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_nonfinite_step_stops_and_leaves_the_good_states_byte_identical(tune, tmp_path):
    out = tmp_path / "run"
    tune(*DEMO, f"output_dir={out}", *QUIET, "max_steps_per_epoch=2", "save_every_n_steps=1")
    good = _digests(out)
    assert {"training_state/step_1/rank_00000.pt", "training_state/step_2/rank_00000.pt"} <= good.keys()

    # lr=1e30: step 1 (at lr 5e29 in the warm-up) makes the weights huge, step 2's loss is NaN
    proc = tune(*DEMO, f"output_dir={out}", *QUIET, "optimizer.lr=1e30", "max_steps_per_epoch=3", check=False)
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # batch_size 2, no shuffling: step 2 reads rows 2 and 3
    assert "Step 2 is not finite (loss=nan" in err and "on dataset rows [2, 3]" in err, err[-3000:]
    assert f"the newest training state on disk, untouched, is {out}/training_state/step_2" in err
    assert "Step 3 |" not in err
    assert _digests(out) == good

    # AdamW with eps=0: step 1's loss and grad norm are finite, but its update is 0/0 = NaN for every weight
    # without gradient (embedding rows of absent tokens): the save refuses
    proc = tune(
        *DEMO,
        f"output_dir={out}",
        *QUIET,
        "optimizer.eps=0",
        "max_steps_per_epoch=1",
        "save_every_n_steps=1",
        check=False,
    )
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Not saving: the weights or optimizer state are not finite" in err, err[-3000:]
    assert _digests(out) == good


def test_nonfinite_steps_are_skipped_up_to_the_limit_on_every_rank(tune, tmp_path):
    out = tmp_path / "run"
    proc = tune(
        *DEMO_2,
        f"output_dir={out}",
        *QUIET,
        "batch_size=1",
        "optimizer.lr=1e30",
        "max_steps_per_epoch=4",
        "max_nonfinite_steps=1",
        check=False,
    )
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # two ranks of batch 1, no shuffling: rank r reads rows r, r + 2, ...; the message names both ranks' rows
    assert re.search(r"Step 2 is not finite \(loss=nan.*on dataset rows \[2, 3\]: skipped", err), err[-3000:]
    assert "Step 3 is not finite (loss=nan" in err and "on dataset rows [4, 5]; steps skipped before: [2]" in err
    assert not (out / "epoch_0").exists() and not (out / "training_state").exists()


def test_first_step_trains_and_each_step_logs_the_lr_it_used(tune, tmp_path):
    out = tmp_path / "run"
    # one batch (rows 0 and 1) repeated: 3 epochs of 1 step, no shuffling
    tune(*DEMO, f"output_dir={out}", *QUIET, "epochs=3", "max_steps_per_epoch=1")
    m = _metrics(out)
    assert sorted(m) == [1, 2, 3]
    # cosine_with_warmup, lr 3e-3, 2 warm-up steps, 3 steps, min_lr 3e-4, by hand: step n of the warm-up runs
    # at lr * n / 2, then half a cosine reaching min_lr at the last step
    peak, floor = 3e-3, 3e-4
    expected = [peak * 1 / 2, peak * 2 / 2, floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * 1.0))]
    assert [m[n]["lr"] for n in (1, 2, 3)] == pytest.approx(expected, rel=1e-9)
    # step 1 changed the weights: the same batch gives another loss at step 2
    assert m[1]["loss"] != m[2]["loss"]
    assert m[2]["loss"] < m[1]["loss"]


def test_pipeline_layout_runs_on_the_demo_with_the_default_microbatches(tune, tmp_path):
    # no pipeline_microbatches override: the documented default (the pipeline degree, 2) applies
    proc = tune(*DEMO_2, f"output_dir={tmp_path}", "pipeline_parallel_dim=2", "max_steps_per_epoch=1")
    assert "schedule 1F1B, 2 micro-batches" in proc.stdout + proc.stderr
    assert sorted(_metrics(tmp_path)) == [1]


def test_world_size_error_repeats_the_whole_command(tune, tmp_path):
    proc = tune(
        *DEMO,
        f"output_dir={tmp_path}",
        "optimizer.lr=1e-4",
        "tensor_parallel_dim=2",
        "dataset.split=train",
        check=False,
    )
    assert proc.returncode != 0
    assert (
        "tune run --nproc_per_node 2 full_finetune_distributed --config mistral3p5_medpix_demo "
        f"output_dir={tmp_path} optimizer.lr=1e-4 tensor_parallel_dim=2 dataset.split=train\n"
    ) in proc.stderr
