"""Faults of a training run through the real `tune run` (demo config, CPU/gloo): each must stop clearly or be
handled, and never overwrite a good checkpoint or training state."""

import contextlib
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

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

    # lr=1e30: step 1 (at lr 5e29 in the warm-up) makes the weights huge, step 2's loss is NaN. A new run into
    # this output_dir must say overwrite_output_dir=True, and replaces nothing before its first complete save.
    overwrite = "overwrite_output_dir=True"
    proc = tune(*DEMO, f"output_dir={out}", *QUIET, overwrite, "optimizer.lr=1e30", "max_steps_per_epoch=3",
                check=False)
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
        overwrite,
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


def test_each_step_trains_logs_its_lr_and_validates_as_transformers(tune, tmp_path):
    """One run checks the lr schedule, that step 1 trains, and the validation loss (one `tune run` for both)."""
    from torchtune_mistral3.reference_check import first_step_batches, load_run_config, transformers_loss

    out = tmp_path / "run"
    # one batch (rows 0 and 1) repeated: 3 epochs of 1 step, no shuffling; validation after every step
    overrides = [
        f"output_dir={out}",
        "dtype=fp32",
        "shuffle=False",
        "epochs=3",
        "max_steps_per_epoch=1",
        "run_val_every_n_steps=1",
        "max_val_steps=2",
        "checkpointer.save_dtype=fp32",
    ]
    tune(*DEMO, *overrides)
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

    assert all("val_loss" in m[n] for n in (1, 2, 3))
    # the validation of step 3 ran on the weights saved at the end: the first 2 validation batches, by transformers
    cfg = load_run_config("mistral3p5_medpix_demo", overrides)
    cfg.dataset, cfg.gradient_accumulation_steps = cfg.dataset_val, 2
    cfg.batch_size = cfg.get("batch_size_val", cfg.batch_size)
    batches = first_step_batches(cfg)
    expected, tokens = transformers_loss(str(out / "epoch_2"), batches, torch.float32)
    assert tokens > 0
    assert m[3]["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert m[1]["val_loss"] != m[3]["val_loss"]


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


def _start_demo_2(tmp_path, *overrides):
    """A 2-process demo run in the background; returns the process and its output files."""
    out, err = open(tmp_path / "stdout.txt", "w"), open(tmp_path / "stderr.txt", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torchtune._cli.tune", *DEMO_2, f"output_dir={tmp_path / 'run'}", *overrides]
    return subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)


def _rank_pid(proc, rank, deadline):
    """pid of the worker of ``rank`` under the `tune run` process (torchrun's agent runs inside it)."""
    while time.monotonic() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.environ().get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in child.environ():
                    return child.pid
        time.sleep(0.5)
    raise AssertionError("no worker process found")


def _wait_for_step(tmp_path, step, proc, deadline):
    while time.monotonic() < deadline and proc.poll() is None:
        logs = list((tmp_path / "run" / "logs").glob("*.txt"))
        if logs and f"Step {step} |" in logs[0].read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} was not logged: {(tmp_path / 'stderr.txt').read_text()[-3000:]}")


def _signal_rank_after_step(tmp_path, signum, step, overrides, wait_s):
    """Run the 2-process demo, send ``signum`` to rank 1 once ``step`` is logged; return (rc, seconds, output)."""
    proc = _start_demo_2(tmp_path, *overrides)
    pid = None
    try:
        deadline = time.monotonic() + 600
        pid = _rank_pid(proc, 1, deadline)
        _wait_for_step(tmp_path, step, proc, deadline)
        os.kill(pid, signum)
        t0 = time.monotonic()
        rc = proc.wait(timeout=wait_s)
        elapsed = time.monotonic() - t0
    finally:
        for p in (pid, proc.pid):
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(p, signal.SIGCONT)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc, elapsed, (tmp_path / "stdout.txt").read_text() + (tmp_path / "stderr.txt").read_text()


def test_a_stopped_rank_ends_the_job_after_the_timeout_naming_it(tmp_path):
    timeout_s = 15
    overrides = [*QUIET, "batch_size=1", "max_steps_per_epoch=12", f"distributed_timeout_s={timeout_s}"]
    rc, elapsed, output = _signal_rank_after_step(tmp_path, signal.SIGSTOP, 1, overrides, wait_s=timeout_s + 300)
    assert rc != 0
    # rank 0 gives up after the timeout; torchrun then ends the stopped rank (SIGTERM, SIGKILL after 30 s)
    assert timeout_s - 2 < elapsed < timeout_s + 90, elapsed
    assert f"did not complete within distributed_timeout_s={timeout_s} on rank 0" in output, output[-4000:]
    assert re.search(
        r"Collective (all_reduce|barrier|all_gather\w*|broadcast\w*|reduce_scatter\w*) called from", output
    )
    print(f"stopped rank: job ended {elapsed:.1f} s after SIGSTOP with distributed_timeout_s={timeout_s}")


def test_a_killed_rank_ends_the_job_at_once_and_keeps_the_last_state(tmp_path):
    overrides = [*QUIET, "batch_size=1", "max_steps_per_epoch=12", "save_every_n_steps=2"]
    rc, elapsed, output = _signal_rank_after_step(tmp_path, signal.SIGKILL, 3, overrides, wait_s=300)
    assert rc != 0
    assert elapsed < 60, elapsed  # far below the 1800 s timeout: a dead peer closes its sockets
    states = tmp_path / "run" / "training_state"
    # the state of step 2 is complete (written before the kill); no step after it was written
    assert sorted(p.name for p in states.iterdir() if not p.name.startswith(".")) == ["step_2"]
    assert sorted(p.name for p in (states / "step_2").iterdir()) == [
        "layout.json", "rank_00000.pt", "rank_00001.pt", "run.json"]
    print(f"killed rank: job ended {elapsed:.1f} s after SIGKILL")


def _hf_model(checkpoint_dir):
    """transformers' model of a checkpoint directory (FP8 dequantised by transformers), fp32, eval mode."""
    from transformers import FineGrainedFP8Config, Mistral3ForConditionalGeneration

    config = json.loads((checkpoint_dir / "config.json").read_text())
    kwargs = {}
    if config.get("quantization_config", {}).get("quant_method") == "fp8":
        kwargs["quantization_config"] = FineGrainedFP8Config(
            dequantize=True, weight_block_size=None, activation_scheme="static"
        )
    return Mistral3ForConditionalGeneration.from_pretrained(
        checkpoint_dir, dtype=torch.float32, attn_implementation="eager", **kwargs
    ).eval()


def test_label_smoothing_of_the_loss_is_honoured(tune, tmp_path):
    from torchtune_mistral3.reference_check import first_step_batches, load_run_config

    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}",
        *QUIET,
        "max_steps_per_epoch=1",
        "loss._component_=torch.nn.CrossEntropyLoss",
        "loss.label_smoothing=0.1",
    ]
    tune(*DEMO, *overrides)
    # step 1's loss by torch's own label-smoothed cross-entropy on transformers' logits of the initial weights
    model = _hf_model(out / "tiny_fp8_checkpoint")
    (batch,) = first_step_batches(load_run_config("mistral3p5_medpix_demo", overrides))
    images = batch["encoder_input"]["image"]
    with torch.no_grad():
        logits = model(
            input_ids=batch["tokens"],
            attention_mask=(batch["tokens"] != 11).long(),
            pixel_values=images["pixel_values"],
            image_sizes=images["image_sizes"],
        ).logits
    labels = batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), label_smoothing=0.1
    )
    assert _metrics(out)[1]["loss"] == pytest.approx(float(expected), rel=1e-5)

    proc = tune(*DEMO, f"output_dir={tmp_path / 'nll'}", "loss._component_=torch.nn.NLLLoss", check=False)
    assert proc.returncode != 0
    assert "loss._component_=torch.nn.modules.loss.NLLLoss is not supported" in proc.stderr
    assert "Instantiating" not in proc.stdout + proc.stderr  # refused before the model is built


def test_a_rank_killed_inside_a_training_state_save_leaves_the_previous_state(tmp_path):
    from torchtune_mistral3.training import latest_training_state

    overrides = [*QUIET, "batch_size=1", "max_steps_per_epoch=12", "save_every_n_steps=2"]
    proc = _start_demo_2(tmp_path, *overrides)
    states = tmp_path / "run" / "training_state"
    try:
        deadline = time.monotonic() + 600
        pid = _rank_pid(proc, 1, deadline)
        # kill rank 1 while the ranks write their files of step 4 (into a partial directory, renamed when all are done)
        started = [states / d / f"rank_{r:05d}.pt" for d in (".step_4.partial", "step_4") for r in (0, 1)]
        while not any(p.exists() for p in started):
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc != 0
    assert not (states / "step_4").exists()
    assert latest_training_state(tmp_path / "run") == states / "step_2"
    assert sorted(p.name for p in (states / "step_2").iterdir()) == [
        "layout.json", "rank_00000.pt", "rank_00001.pt", "run.json"]
