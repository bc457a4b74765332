"""Packed batches (``dataset.packed=True``) through the real `tune run` command (CPU, gloo, fp32).

The layout tests' 4-layer model and helpers: every parallel layout gives the one-process packed losses and
grad norms over 3 steps of 2 packs, and a packed run stopped after step 2 and resumed gives the
uninterrupted run's step 3 (the packed loader's position restored: step 3 reads packs 4 and 5).
"""

import shutil

import pytest

from tests.recipes.test_tune_run_parallel_layouts import LAYOUTS, _run, checkpoint  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

# 128-token packs of ~45-token samples (positions pass the demo model's YaRN L0 of 32 inside every sample)
PACKED = ["dataset.packed=True", "tokenizer.max_seq_len=128", "save_every_n_steps=1"]
# layout -> extra overrides (activation checkpointing rides along with the 3-D layout: it must not change a loss)
# (interleaved, the 128B config's schedule, covers what 1F1B would: the pack's mask and positions sent per stage)
# (tp2_pp2: the mistral3p5_medpix layout in small, TP with sequence parallelism x interleaved PP, compiled)
PACKED_LAYOUTS = {
    "tp2": ["tensor_parallel_plan.sequence_parallel=True"],
    "tp2_pp2": ["tensor_parallel_plan.sequence_parallel=True", "pipeline_schedule=Interleaved1F1B"],
    "fsdp2_tp2": ["enable_activation_checkpointing=True"],
}


@pytest.fixture(scope="module")
def single_packed(tmp_path_factory, checkpoint):  # noqa: F811
    from tests.conftest import run_tune

    out = tmp_path_factory.mktemp("single_packed")
    metrics, _ = _run(run_tune, out, checkpoint, 1, PACKED)
    return out, metrics


def test_packed_steps_log_samples_real_tokens_and_padding(single_packed):
    _, metrics = single_packed
    assert sorted(metrics) == [1, 2, 3]
    for m in metrics.values():
        # 2 packs of 128 tokens per step hold more than 2 samples; real tokens + padding fill the 256 slots
        assert m["samples"] > 2
        assert m["real_tokens"] == pytest.approx(256 * (1 - m["padding_fraction"]))
        assert 0 < m["padding_fraction"] < 0.5


@pytest.mark.parametrize("layout", list(PACKED_LAYOUTS))
def test_packed_layout_equals_one_process(tune, tmp_path, checkpoint, single_packed, layout):  # noqa: F811
    nproc, overrides = LAYOUTS[layout]
    _, ref = single_packed
    metrics, _ = _run(tune, tmp_path, checkpoint, nproc, [*PACKED, *overrides, *PACKED_LAYOUTS[layout]])
    assert sorted(metrics) == [1, 2, 3]
    for step in (1, 2, 3):
        assert metrics[step]["samples"] == ref[step]["samples"], step
        assert metrics[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step
        assert metrics[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4), step


def test_packed_resume_equals_uninterrupted(tune, tmp_path, checkpoint, single_packed):  # noqa: F811
    ref_dir, ref = single_packed
    # a run that stopped after step 2 (the states of steps 2 and 3 are kept)
    shutil.copytree(ref_dir / "training_state" / "step_2", tmp_path / "training_state" / "step_2")
    metrics, output = _run(tune, tmp_path, checkpoint, 1, [*PACKED, "resume_from_checkpoint=True"])
    assert "Resumed from" in output
    assert sorted(metrics) == [3]
    timings = ("tokens_per_second_per_gpu", "step_time_s", "data_wait_s", "unix_time_s")  # wall clock, not state
    assert metrics[3] == ref[3] | {k: metrics[3][k] for k in timings}


def test_packed_validation_gives_the_unpacked_validation_loss(tune, tmp_path, checkpoint):  # noqa: F811
    # validation is the token mean over the whole validation split, packed or not; a packed validation set too
    # small for one full batch is refused at start (it would log val_loss 0.0)
    val = ["run_val_every_n_steps=1", "max_steps_per_epoch=1", "max_val_steps=null", "batch_size_val=1"]
    unpacked, _ = _run(tune, tmp_path / "unpacked", checkpoint, 1, [*PACKED, *val])
    packed, _ = _run(tune, tmp_path / "packed", checkpoint, 1, [*PACKED, *val, "dataset_val.packed=True"])
    assert packed[1]["val_loss"] == pytest.approx(unpacked[1]["val_loss"], rel=1e-6)
    proc = tune("run", "full_finetune_distributed", "--config", "mistral3p5_medpix_demo",
                f"output_dir={tmp_path / 'empty'}", f"checkpoint_dir={checkpoint}", *PACKED,
                "dataset_val.packed=True", "batch_size_val=64", check=False)
    assert proc.returncode == 1
    assert "dataset_val gives 0 batches of batch_size_val=64 packs per data-parallel rank" in proc.stderr
