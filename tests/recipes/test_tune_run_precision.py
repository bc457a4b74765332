"""The precision policy through the real `tune run` command (CPU, gloo) on the demo config.

bf16 matmuls are about 20x slower than fp32 ones on the CI's CPUs (no bf16 instructions), so these runs are
short: one sample repeated (``epochs=N max_steps_per_epoch=1 batch_size=1 shuffle=False``), the 131k-row head
and the embeddings frozen (their matmuls dominate), no validation. Measured on the shared 2-core machine while
other runs used it: 373 s (learning), 508 s (one process vs FSDP2), 271 s (resume), 43-55 s (refusals); an
uncontended bf16 step here takes ~8 s (learning: 72 s, one process vs FSDP2: 89 s on free cores).
"""

import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

DEMO = ["full_finetune_distributed", "--config", "mistral3p5_medpix_demo"]
# one sample, repeated; constant learning rate 1e-5 (cosine with min_lr = lr and no warm-up); no clipping
FIXED_DATA = [
    "max_steps_per_epoch=1",
    "batch_size=1",
    "shuffle=False",
    "run_val_every_n_steps=null",
    "lr_scheduler.num_warmup_steps=0",
    "lr_scheduler.min_lr=1e-5",
    "optimizer.lr=1e-5",
    "clip_grad_norm=null",
    "model.output_trainable=False",
    "model.embeddings_trainable=False",
]


def _losses(output_dir):
    (log,) = (output_dir / "logs").glob("*.txt")
    return {int(m[1]): float(m[2]) for m in re.finditer(r"Step (\d+) \| .*?loss:([-+0-9.eE]+)", log.read_text())}


def _weights(directory):
    (f,) = directory.glob("*.safetensors")
    return load_file(f)


def _is_bf16_exact(t):
    return torch.equal(t, t.to(torch.bfloat16).to(t.dtype))


def _fp32_loss(overrides, checkpoint_dir):
    """transformers' fp32 loss of ``checkpoint_dir`` on the run's (fixed) sample: no bf16 rounding in the measure."""
    from torchtune_mistral3.reference_check import first_step_batches, load_run_config, transformers_loss

    cfg = load_run_config("mistral3p5_medpix_demo", overrides)
    return transformers_loss(str(checkpoint_dir), first_step_batches(cfg), torch.float32)[0]


def test_default_policy_learns_like_fp32(tune, tmp_path):
    """bf16 compute with fp32 master weights (the default) keeps the fp32 run's progress at lr 1e-5.

    The progress is the fp32 loss (transformers) of the saved weights on the repeated sample, before and after:
    the loss a bf16 run logs carries bf16 rounding of the logits, a few 1e-3, as large as a few steps' drop.
    """
    common = [*FIXED_DATA, "epochs=3", "checkpointer.save_dtype=fp32"]
    drops = {}
    for name, overrides in {"fp32": ["dtype=fp32"], "default": ["dtype=bf16"]}.items():
        run = [f"output_dir={tmp_path / name}", *common, *overrides]
        tune("run", *DEMO, *run)
        if not drops:
            start = _fp32_loss(run, tmp_path / name / "tiny_fp8_checkpoint")
        drops[name] = start - _fp32_loss(run, tmp_path / name / "epoch_2")
    assert drops["fp32"] > 0.015, drops
    assert drops["default"] == pytest.approx(drops["fp32"], rel=0.10), drops


def test_one_process_equals_fsdp2_under_mixed_precision(tune, tmp_path):
    """One process (FSDP2 on a mesh of 1) accumulating 2 micro-batches = 2 FSDP2 ranks of 1 sample, bit for bit."""
    common = [
        *FIXED_DATA,
        "epochs=1",
        "max_steps_per_epoch=2",
        "dtype=bf16",
        "optimizer.lr=1e-3",
        "lr_scheduler.min_lr=1e-3",
        "checkpointer.save_dtype=fp32",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    tune("run", *DEMO, f"output_dir={one}", *common, "gradient_accumulation_steps=2")
    tune("run", "--nproc_per_node", "2", *DEMO, f"output_dir={two}", *common)
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l1) == sorted(l2) == [1, 2]
    assert l1 == l2
    w1, w2 = _weights(one / "epoch_0"), _weights(two / "epoch_0")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    # the trained decoder weights are fp32 masters, not bf16 values
    trained = [k for k in w1 if ".layers.0." in k and k.startswith("model.language_model") and "proj" in k]
    assert trained and not any(_is_bf16_exact(w1[k]) for k in trained)


def test_resume_continues_bit_for_bit_under_mixed_precision(tune, tmp_path):
    common = [
        *FIXED_DATA,
        "epochs=1",
        "max_steps_per_epoch=3",
        "save_every_n_steps=2",
        "dtype=bf16",
        "optimizer.lr=1e-3",
        "lr_scheduler.min_lr=1e-3",
        "checkpointer.save_dtype=fp32",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    tune("run", *DEMO, f"output_dir={straight}", *common)
    (resumed / "training_state").mkdir(parents=True)
    shutil.copytree(straight / "training_state" / "step_2", resumed / "training_state" / "step_2")
    state = torch.load(resumed / "training_state" / "step_2" / "rank_00000.pt", weights_only=False)
    assert {v.dtype for v in state["model"][0].values()} == {torch.float32}
    proc = tune("run", *DEMO, f"output_dir={resumed}", *common, "resume_from_checkpoint=True")
    assert "Resumed from" in proc.stdout + proc.stderr
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == [3] and a[3] == b[3]
    wa, wb = _weights(straight / "epoch_0"), _weights(resumed / "epoch_0")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dtype=bf16", "fp8_recipe=tensorwise"], "fp8_recipe needs a GPU with FP8 tensor cores"),
        (["dtype=bf16", "master_dtype=fp16"], "master_dtype=fp16 is not a precision this recipe trains in"),
    ],
    ids=["fp8_on_cpu", "unknown_master_dtype"],
)
def test_precision_refused_before_building(tune, tmp_path, overrides, message):
    proc = tune("run", *DEMO, f"output_dir={tmp_path}", *overrides, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Instantiating the model" not in proc.stdout + proc.stderr
