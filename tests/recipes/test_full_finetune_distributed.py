"""The plugin recipe through the real `tune run` command (CPU, gloo), against transformers' loss.

Every run uses the demo config (tiny model of the Mistral Medium 3.5 architecture, FP8 checkpoint in the
real format, real tekken tokenizer, the bundled real-image MedPix sample) with overrides.
"""

import copy
import json
import re
import subprocess
import sys
import time

import pytest
import torch
from torchtune_mistral3.checkpointing import DEMO_HF_CONFIG, write_demo_checkpoint

pytestmark = pytest.mark.integration

FP32_FIRST_BATCH = ["dtype=fp32", "shuffle=False", "run_val_every_n_steps=null"]


def _losses(output_dir):
    (log,) = (output_dir / "logs").glob("*.txt")
    return {int(m[1]): float(m[2]) for m in re.finditer(r"Step (\d+) \| .*?loss:([-+0-9.eE]+)", log.read_text())}


def _reference_check(config, overrides, data_parallel=1):
    proc = subprocess.run(
        [sys.executable, "-m", "torchtune_mistral3.reference_check", "--config", config,
         "--data-parallel", str(data_parallel), *overrides],
        capture_output=True, text=True, timeout=600,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return proc.returncode, result


def _other_dims_checkpoint(path):
    """A second tiny checkpoint: other widths, head_dim = hidden / heads, mscale_all_dim 1, 3 layers, 3 vision heads."""
    cfg = copy.deepcopy(DEMO_HF_CONFIG)
    cfg["text_config"].update(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
                              num_key_value_heads=3, head_dim=8)
    cfg["text_config"]["rope_parameters"].update(mscale_all_dim=1.0, beta_fast=32.0, llama_4_scaling_beta=0.3,
                                                 original_max_position_embeddings=16, factor=16.0)
    cfg["text_config"]["max_position_embeddings"] = 256
    cfg["vision_config"].update(hidden_size=48, intermediate_size=80, num_attention_heads=3, num_hidden_layers=1)
    return write_demo_checkpoint(str(path), seed=7, hf_config=cfg)


# two of the four (checkpoint x batch) pairs: each checkpoint once, each batch shape once (CI time on 2 cores)
@pytest.mark.parametrize(
    "checkpoint,batch",
    [("demo", ["batch_size=2", "gradient_accumulation_steps=2"]),
     ("other_dims", ["batch_size=1", "gradient_accumulation_steps=1"])],
    ids=["bs2x2-demo", "bs1-other_dims"],
)
def test_first_logged_loss_equals_transformers(tune, tmp_path, checkpoint, batch):
    overrides = [f"output_dir={tmp_path / 'run'}", *FP32_FIRST_BATCH, "max_steps_per_epoch=1", *batch]
    if checkpoint == "other_dims":
        ckpt = _other_dims_checkpoint(tmp_path / "other")
        overrides += [f"checkpoint_dir={ckpt}", "prepare_checkpoint=null"]
    tune("run", "full_finetune_distributed", "--config", "mistral3p5_medpix_demo", *overrides)
    code, result = _reference_check("mistral3p5_medpix_demo", overrides)
    assert result["label_tokens"] > 0
    assert result["rel_diff"] <= 1e-5, result
    assert code == 0


def test_one_and_two_processes_train_the_same_and_save_what_transformers_loads(tune, tmp_path):
    common = [*FP32_FIRST_BATCH, "max_steps_per_epoch=3"]
    one = tmp_path / "one"
    two = tmp_path / "two"
    # the same global batch of 2 samples per step: one process with batch 2, or two data-parallel ranks with 1 each
    tune("run", "full_finetune_distributed", "--config", "mistral3p5_medpix_demo", f"output_dir={one}", "batch_size=2",
         *common)
    tune("run", "--nproc_per_node", "2", "full_finetune_distributed", "--config", "mistral3p5_medpix_demo",
         f"output_dir={two}", "batch_size=1", *common)
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3]
    for step in l1:
        assert torch.isfinite(torch.tensor(l1[step]))
        assert l1[step] == pytest.approx(l2[step], rel=1e-5, abs=1e-6), step

    from transformers import Mistral3ForConditionalGeneration

    saved_one = Mistral3ForConditionalGeneration.from_pretrained(one / "epoch_0", dtype=torch.float32)
    saved_two = Mistral3ForConditionalGeneration.from_pretrained(two / "epoch_0", dtype=torch.float32)
    sd1, sd2 = saved_one.state_dict(), saved_two.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        torch.testing.assert_close(sd1[k], sd2[k], rtol=0, atol=2e-2 if sd1[k].abs().max() > 1 else 4e-3, msg=k)


def test_missing_checkpoint_stops_at_once_with_the_download_command(tune, tmp_path):
    start = time.monotonic()
    proc = tune("run", "full_finetune_distributed", "--config", "mistral3p5_medpix",
                f"checkpoint_dir={tmp_path / 'nowhere'}", f"output_dir={tmp_path / 'out'}", check=False)
    assert proc.returncode != 0
    assert f"tune download mistralai/Mistral-Medium-3.5-128B --output-dir {tmp_path / 'nowhere'}" in proc.stderr
    assert "Instantiating" not in proc.stdout + proc.stderr  # nothing was built before the check
    assert time.monotonic() - start < 120


def test_layout_larger_than_the_launch_names_the_flags(tune, tmp_path):
    proc = tune("run", "full_finetune_distributed", "--config", "mistral3p5_medpix_demo", f"output_dir={tmp_path}",
                "tensor_parallel_dim=2", check=False)
    assert proc.returncode != 0
    assert "tune run --nproc_per_node 2 full_finetune_distributed --config mistral3p5_medpix_demo" in proc.stderr


def test_resume_continues_bit_for_bit_under_fsdp(tune, tmp_path):
    common = ["dtype=fp32", "run_val_every_n_steps=null", "max_steps_per_epoch=4", "save_every_n_steps=2",
              "batch_size=1", "checkpointer.save_dtype=fp32"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch = ["run", "--nproc_per_node", "2", "full_finetune_distributed", "--config", "mistral3p5_medpix_demo"]
    tune(*launch, f"output_dir={straight}", *common)
    assert sorted(p.name for p in (straight / "training_state").iterdir()) == ["step_2", "step_4"]
    # a run that stopped after step 2: only its first training state exists
    (resumed / "training_state").mkdir(parents=True)
    import shutil

    shutil.copytree(straight / "training_state" / "step_2", resumed / "training_state" / "step_2")
    proc = tune(*launch, f"output_dir={resumed}", *common, "resume_from_checkpoint=True")
    assert "Resumed from" in proc.stdout + proc.stderr
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == [3, 4]
    assert a[3] == b[3] and a[4] == b[4]

    from safetensors.torch import load_file

    (fa,) = (straight / "epoch_0").glob("*.safetensors")
    (fb,) = (resumed / "epoch_0").glob("*.safetensors")
    wa, wb = load_file(fa), load_file(fb)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_with_another_layout_is_refused_with_the_way_out(tune, tmp_path):
    common = ["run_val_every_n_steps=null", "max_steps_per_epoch=2", "save_every_n_steps=1", f"output_dir={tmp_path}"]
    tune("run", "full_finetune_distributed", "--config", "mistral3p5_medpix_demo", *common)
    proc = tune("run", "--nproc_per_node", "2", "full_finetune_distributed", "--config", "mistral3p5_medpix_demo",
                *common, "resume_from_checkpoint=True", check=False)
    assert proc.returncode != 0
    assert "was saved with layout" in proc.stderr and "checkpoint_dir=<output_dir>/epoch_<N>" in proc.stderr


def test_validation_with_a_v_schedule_is_refused_before_training(tune, tmp_path):
    proc = tune("run", "--nproc_per_node", "2", "full_finetune_distributed", "--config", "mistral3p5_medpix_demo",
                f"output_dir={tmp_path}", "pipeline_parallel_dim=2", "pipeline_schedule=ZBVZeroBubble", check=False)
    assert proc.returncode != 0
    assert "pipeline_schedule=ZBVZeroBubble cannot run validation" in proc.stderr
    assert "Step 1 |" not in proc.stdout + proc.stderr


def test_image_free_micro_batch_is_refused_where_fsdp_cannot_reduce_unused_params():
    # torch 2.11's FSDP2 has no set_reduce_scatter_unused_params: a replica whose micro-batch has no image would
    # skip the trainable projector's reduce-scatter that the others join (a hang). The recipe refuses that batch
    # by name instead; with the switch (or no such encoder) it lets every batch through.
    from types import SimpleNamespace

    from torchtune_mistral3.finetune import Mistral3FullFinetuneRecipe

    check = Mistral3FullFinetuneRecipe._check_images_on_old_fsdp

    def batch(images):
        return {"tokens": torch.zeros(2, 4), "encoder_input": {"image": {"images_per_sample": torch.tensor(images)}}}

    old = SimpleNamespace(_image_free_batches_hang=True, dp_rank=1, _step_rows=[7, 9])
    check(old, [batch([1, 0])])  # one image in the micro-batch: its projector takes part
    with pytest.raises(RuntimeError, match=r"dp rank 1: a micro-batch without images \(dataset rows \[7, 9\]\)"):
        check(old, [batch([1, 1]), batch([0, 0])])
    check(SimpleNamespace(_image_free_batches_hang=False, dp_rank=0, _step_rows=[]), [batch([0, 0])])
