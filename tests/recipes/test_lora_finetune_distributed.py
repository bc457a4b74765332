"""The LoRA recipe through the real `tune run lora_finetune_distributed` (CPU, gloo) on the LoRA demo config.

The demo keeps the frozen decoder linears in the checkpoint's FP8 (``model.fp8_base: True``).
"""

import re
import shutil

import pytest
import torch

pytestmark = pytest.mark.integration

CONFIG = "mistral3p5_medpix_lora_demo"
COMMON = ["dtype=fp32", "shuffle=False", "run_val_every_n_steps=null", "max_steps_per_epoch=4",
          "save_merged_model=False"]
ONE = ["run", "lora_finetune_distributed", "--config", CONFIG, "batch_size=2"]
TWO = ["run", "--nproc_per_node", "2", "lora_finetune_distributed", "--config", CONFIG, "batch_size=1"]
# the FSDP run also writes the merged model (FP8 base shards gathered as bytes)
TWO_SAVES = ["save_every_n_steps=2", "save_merged_model=True", "checkpointer.save_dtype=fp32"]


def _losses(output_dir):
    (log,) = (output_dir / "logs").glob("*.txt")
    return {int(m[1]): float(m[2]) for m in re.finditer(r"Step (\d+) \| .*?loss:([-+0-9.eE]+)", log.read_text())}


def _adapter(output_dir):
    from safetensors.torch import load_file

    return load_file(output_dir / "epoch_0" / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same global batch of 2 samples per step: one process with batch 2, or two FSDP ranks with 1 each."""
    from conftest import run_tune

    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    run_tune(*ONE, f"output_dir={one}", *COMMON)
    run_tune(*TWO, f"output_dir={two}", *COMMON, *TWO_SAVES)
    return one, two


def test_one_process_and_fsdp_train_the_same(runs):
    one, two = runs
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    assert l1[4] < l1[1]  # the adapters learn
    for step in l1:
        assert l1[step] == pytest.approx(l2[step], rel=1e-5, abs=1e-6), step
    a1, a2 = _adapter(one), _adapter(two)
    assert a1.keys() == a2.keys()
    # Adam divides by sqrt(v): the first non-zero A gradients (B was 0 at step 1) are tiny, so summation-order
    # noise between the layouts shows as ~1e-4 relative in A after 4 steps (measured: <= 5.2e-5 abs of 0.09).
    for k in a1:
        torch.testing.assert_close(a1[k], a2[k], rtol=0, atol=1e-4, msg=k)


def test_resume_continues_bit_for_bit_under_fsdp(tune, runs, tmp_path):
    _, straight = runs
    assert sorted(p.name for p in (straight / "training_state").iterdir()) == ["step_2", "step_4"]
    resumed = tmp_path / "resumed"
    (resumed / "training_state").mkdir(parents=True)
    shutil.copytree(straight / "training_state" / "step_2", resumed / "training_state" / "step_2")
    proc = tune(*TWO, f"output_dir={resumed}", *COMMON, *TWO_SAVES, "resume_from_checkpoint=True")
    assert "Resumed from" in proc.stdout + proc.stderr
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == [3, 4]
    assert a[3] == b[3] and a[4] == b[4]
    wa, wb = _adapter(straight), _adapter(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fsdp_merged_export_is_base_plus_scaled_adapter_product(runs):
    from safetensors.torch import load_file
    from torchtune_mistral3.checkpointing import HFCheckpointReader
    from torchtune_mistral3.checkpointing._peft import peft_key

    _, two = runs
    base = HFCheckpointReader(two / "tiny_fp8_checkpoint")
    merged = HFCheckpointReader(two / "epoch_0")
    adapter = _adapter(two)
    (merged_file,) = (two / "epoch_0").glob("*.safetensors")
    assert "weight_scale_inv" not in " ".join(load_file(merged_file))  # a plain (dequantised) checkpoint
    checked = 0
    for key in base.keys():
        want = base.read(key, torch.float32)
        module = key[: -len(".weight")]
        if base.info(key).is_fp8 and peft_key(module + ".lora_a.weight") in adapter:
            a = adapter[peft_key(module + ".lora_a.weight")].float()
            b = adapter[peft_key(module + ".lora_b.weight")].float()
            want = want + (32 / 8) * (b @ a)
            checked += 1
        torch.testing.assert_close(merged.read(key, torch.float32), want, rtol=1e-6, atol=1e-7, msg=key)
    assert checked == 14  # 2 layers x (4 attention + 3 MLP) adapted linears


def test_fp8_base_trains_as_the_dequantized_base(tune, runs, tmp_path):
    one, _ = runs
    plain = tmp_path / "plain"
    tune(*ONE, f"output_dir={plain}", *COMMON, "model.fp8_base=False")
    l8, lp = _losses(one), _losses(plain)
    assert sorted(l8) == sorted(lp)
    for step in l8:
        assert l8[step] == pytest.approx(lp[step], rel=1e-5), step


def test_tensor_parallel_is_refused_with_the_key_to_change(tune, tmp_path):
    proc = tune(*TWO, f"output_dir={tmp_path}", "tensor_parallel_dim=2", check=False)
    assert proc.returncode != 0
    assert "tensor_parallel_dim=2: the LoRA recipe runs data parallel (FSDP2) only" in proc.stderr
