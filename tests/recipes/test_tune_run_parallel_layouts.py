"""Every parallel layout trains exactly like one process, through the real `tune run` command (CPU, gloo, fp32).

A 4-layer model of the Mistral Medium 3.5 architecture (FP8 checkpoint in the real format); 3 optimizer
steps of 2 samples each with gradient clipping on; losses, grad norms and the saved checkpoints are
compared with the single-process run.
"""

import copy
import re

import pytest
import torch
from safetensors.torch import load_file
from torchtune_mistral3.checkpointing import DEMO_HF_CONFIG, write_demo_checkpoint

pytestmark = pytest.mark.integration

COMMON = [
    "dtype=fp32", "shuffle=False", "run_val_every_n_steps=null", "max_steps_per_epoch=3", "batch_size=2",
    "clip_grad_norm=0.5", "checkpointer.save_dtype=fp32", "prepare_checkpoint=null", "tokenizer.max_seq_len=256",
]

# The TP layouts run compiled (per-block torch.compile, static shapes, batches padded to max_seq_len) and must
# still equal the eager single process; the harness tests (tests/training) keep eager TP covered and compare every
# gradient of compiled TP 2 (test_tp2_compiled_matches_single_process).
COMPILED = ["compile=True"]

LAYOUTS = {
    "tp2": (2, ["tensor_parallel_dim=2", *COMPILED]),
    # eager: batches padded to a multiple of 2 only, not to max_seq_len. Fused AdamW on the TP DTensor shards
    # (torchtune's own recipe refuses fused under TP at start) against the one process's foreach AdamW.
    "tp2_sequence_parallel": (
        2, ["tensor_parallel_dim=2", "tensor_parallel_plan.sequence_parallel=True", "optimizer.fused=True"]),
    # no pipeline_microbatches: the documented default (the pipeline degree, 2) applies
    "pp2_1f1b": (2, ["pipeline_parallel_dim=2", "pipeline_schedule=1F1B"]),
    "pp2_interleaved_4_stages": (
        2, ["pipeline_parallel_dim=2", "pipeline_schedule=Interleaved1F1B", "pipeline_microbatches=2"]),
    "pp2_zero_bubble_v": (2, ["pipeline_parallel_dim=2", "pipeline_schedule=ZBVZeroBubble", "pipeline_microbatches=2"]),
    "tp2_pp2": (4, ["tensor_parallel_dim=2", "pipeline_parallel_dim=2", "pipeline_microbatches=2", *COMPILED]),
    "fsdp2_tp2": (4, ["tensor_parallel_dim=2", "batch_size=1", *COMPILED]),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = copy.deepcopy(DEMO_HF_CONFIG)
    cfg["text_config"]["num_hidden_layers"] = 4
    return write_demo_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "four_layers"), seed=3, hf_config=cfg)


def _run(tune, out, checkpoint, nproc, overrides):
    launch = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    # compiled layouts through dynamo + AOTAutograd (where the TP RecursionError was), without inductor's C++
    # code generation, which costs minutes per run on 2 CPU cores (torchtune's TORCH_COMPILE_BACKEND switch)
    env = {"TORCH_COMPILE_BACKEND": "aot_eager"} if "compile=True" in overrides else None
    proc = tune("run", *launch, "full_finetune_distributed", "--config", "mistral3p5_medpix_demo",
                f"output_dir={out}", f"checkpoint_dir={checkpoint}", *COMMON, *overrides, env=env)
    (log,) = (out / "logs").glob("*.txt")
    metrics = {}
    for m in re.finditer(r"Step (\d+) \| (.*)", log.read_text()):
        metrics[int(m[1])] = {k: float(v) for k, v in re.findall(r"(\w+):([-+0-9.eE]+)", m[2])}
    return metrics, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def single(tmp_path_factory, checkpoint):
    from tests.conftest import run_tune

    out = tmp_path_factory.mktemp("single")
    metrics, _ = _run(run_tune, out, checkpoint, 1, [])
    return out, metrics


# Run here unpacked: all but compiled TP 2 alone (inside tp2_pp2 and fsdp2_tp2, and run packed with sequence
# parallelism in test_tune_run_packed.py): each case is a multi-process `tune run` (CI time). GPipe takes the
# recipe's 1F1B path; every schedule's gradients, GPipe's included, are compared in tests/training/test_pipeline.py.
UNPACKED = [k for k in LAYOUTS if k != "tp2"]


@pytest.mark.parametrize("layout", UNPACKED)
def test_layout_equals_one_process(tune, tmp_path, checkpoint, single, layout):
    nproc, overrides = LAYOUTS[layout]
    ref_dir, ref = single
    # a data-parallel layout splits the same global batch of 2 over its replicas
    metrics, output = _run(tune, tmp_path, checkpoint, nproc, overrides)
    assert sorted(metrics) == [1, 2, 3]
    # under TP the vision tower's images are shared over the TP ranks by default (tensor_parallel_tower: split)
    assert ("TP ranks encode their share" in output) == ("tensor_parallel_dim=2" in overrides)
    if "compile=True" in overrides:
        compiled = r"Compiled \d+ transformer blocks with torch.compile \(decoder blocks with static shapes\)"
        assert re.search(compiled, output)
    for step in (1, 2, 3):
        assert metrics[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step
        # Adam divides by sqrt of tiny second moments, so float-rounding differences of the reductions
        # grow a little over the steps: the grad norm is held to 1e-4.
        assert metrics[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4), step

    ours = _load_all(tmp_path / "epoch_0")
    theirs = _load_all(ref_dir / "epoch_0")
    assert ours.keys() == theirs.keys()
    # Adam's first step moves every weight by lr * sign(grad) (the warm-up gives step 1 a non-zero lr), so a
    # weight whose gradient is near zero shows the reductions' rounding at once: measured 1.26e-5 on one of
    # 10240 down_proj weights under TP2. A wrong update would be off by about lr.
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=5e-5, msg=k)

    if "pipeline_parallel_dim=2" in overrides:
        held = [int(n.replace(",", "")) for n in re.findall(r"holds stages \[[\d, ]+\]: ([\d,]+) of the model", output)]
        total = int(re.search(r"of the model's ([\d,]+) parameters", output)[1].replace(",", ""))
        assert len(held) == nproc
        # each pipeline rank holds a strict part of the model; the stages together hold all of it
        assert all(h < total for h in held)
        tp = 2 if "tensor_parallel_dim=2" in overrides else 1
        assert sum(held) * tp >= total
    if layout == "pp2_1f1b":
        assert "schedule 1F1B, 2 micro-batches" in output


def _load_all(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# bf16 compute onto fp32 master weights (the shipped policy). One process runs FSDP2 on a data-parallel mesh of 1,
# like TP and PP layouts do; bf16 matmuls split over TP ranks round differently from whole ones, so the layouts
# agree to bf16 precision, not bit for bit. 2 steps, head and embeddings frozen (bf16 matmuls are slow on CPU).
MIXED = [
    "dtype=bf16", "master_dtype=fp32", "max_steps_per_epoch=2", "model.output_trainable=False",
    "model.embeddings_trainable=False", "optimizer.lr=1e-4", "lr_scheduler.num_warmup_steps=0",
    "lr_scheduler.min_lr=1e-4",
]
MIXED_LAYOUTS = ["pp2_1f1b", "fsdp2_tp2"]  # TP 2 alone is inside FSDP2 x TP2


@pytest.fixture(scope="module")
def single_mixed(tmp_path_factory, checkpoint):
    from tests.conftest import run_tune

    out = tmp_path_factory.mktemp("single_mixed")
    metrics, _ = _run(run_tune, out, checkpoint, 1, MIXED)
    return out, metrics


@pytest.mark.parametrize("layout", MIXED_LAYOUTS)
def test_layout_equals_one_process_under_mixed_precision(tune, tmp_path, checkpoint, single_mixed, layout):
    nproc, overrides = LAYOUTS[layout]
    ref_dir, ref = single_mixed
    # eager: compiling bf16 blocks on 2 CPU cores would cost CI minutes the fp32 compiled runs already spend
    overrides = [o for o in overrides if o not in COMPILED]
    metrics, output = _run(tune, tmp_path, checkpoint, nproc, [*MIXED, *overrides])
    assert "Precision: compute bf16, master (parameters, gradients, optimizer states) fp32" in output
    assert sorted(metrics) == [1, 2]
    for step in (1, 2):
        assert metrics[step]["loss"] == pytest.approx(ref[step]["loss"], rel=2e-3), step
        assert metrics[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=2e-2), step
    ours, theirs = _load_all(tmp_path / "epoch_0"), _load_all(ref_dir / "epoch_0")
    assert ours.keys() == theirs.keys()
    trained = [k for k in theirs if ".layers." in k and "language_model" in k and k.endswith("proj.weight")]
    assert trained
    for k in theirs:
        # Adam moves a weight by at most ~lr per step, whatever its gradient's rounding
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=5e-4, msg=k)
    for k in trained:  # the layout kept fp32 masters: its trained weights are not bf16 values
        assert not torch.equal(ours[k], ours[k].to(torch.bfloat16).float()), k
