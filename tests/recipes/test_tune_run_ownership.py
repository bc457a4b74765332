"""No lost work, through the real `tune run` on the demo config (issue 25, items 1-3): the demo never deletes a
user's directory, a run owns its output_dir, and resume refuses what it cannot continue exactly."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import tune_env

pytestmark = pytest.mark.integration

DEMO = ["run", "full_finetune_distributed", "--config", "mistral3p5_medpix_demo"]
QUIET = ["run_val_every_n_steps=null", "shuffle=False"]


def _digests(output_dir):
    files = [p for d in ("epoch_0", "training_state") for p in sorted((output_dir / d).rglob("*")) if p.is_file()]
    return {str(p.relative_to(output_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _states(output_dir):
    return sorted(p.name for p in (output_dir / "training_state").iterdir())


def _run_id(directory):
    return json.loads((directory / "run.json").read_text())["run_id"]


def test_a_run_owns_its_output_dir_and_resume_refuses_what_it_cannot_continue(tune, tmp_path):
    out = tmp_path / "run"
    first = [*DEMO, f"output_dir={out}", *QUIET, "max_steps_per_epoch=3", "save_every_n_steps=2"]
    tune(*first)
    assert _states(out) == ["step_2", "step_3"]
    old_run = _run_id(out)
    assert _run_id(out / "training_state" / "step_3") == old_run
    good = _digests(out)

    # the same command again is a new run: refused, naming the run, its files and the three ways on
    proc = tune(*first, check=False)
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"OutputDirTakenError: output_dir {out} holds the work of run {old_run}" in err, err[-3000:]
    assert "epoch_0, training_state/step_2, training_state/step_3" in err
    assert "resume_from_checkpoint=True" in err and f"output_dir={out / 'run_2'}" in err
    assert "overwrite_output_dir=True" in err
    assert "Instantiating" not in err  # refused before the model is built
    assert _digests(out) == good

    # resume with another batch (the 2 -> 4), seed and learning rate: refused with saved and new values
    proc = tune(*first, "resume_from_checkpoint=True", "batch_size=4", "seed=1", "optimizer.lr=1e-3", check=False)
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"Cannot resume {out / 'training_state' / 'step_3'} exactly" in err, err[-3000:]
    for diff in ("batch_size: 2 -> 4", "seed: 1234 -> 1", "optimizer.lr: 0.003 -> 0.001",
                 "batches_per_epoch of the training data: 12 -> 6"):
        assert diff in err, diff
    assert _digests(out) == good

    # overwrite_output_dir=True: a new run; the old run's states go once its first state is complete, and
    # resume then continues the new run, not the old one
    second = [*DEMO, f"output_dir={out}", *QUIET, "max_steps_per_epoch=2", "save_every_n_steps=1"]
    tune(*second, "overwrite_output_dir=True")
    new_run = _run_id(out)
    assert new_run != old_run
    assert _states(out) == ["step_1", "step_2"]
    assert {_run_id(out / "training_state" / s) for s in _states(out)} == {new_run}
    assert json.loads((out / "run.json").read_text())["replaced"]["run"] == old_run
    proc = tune(*second, "resume_from_checkpoint=True", "log_every_n_steps=2", "run_val_every_n_steps=1")
    assert f"Resumed from {out / 'training_state' / 'step_2'}: step 2" in proc.stdout + proc.stderr


def test_demo_writer_refuses_a_trained_checkpoint_dir_and_keeps_it(tune, tmp_path):
    # the layout error's advice, checkpoint_dir=<output_dir>/epoch_<N>, on the demo config (prepare_checkpoint on)
    trained = tmp_path / "trained" / "epoch_0"
    trained.mkdir(parents=True)
    (trained / "config.json").write_text("{}")
    (trained / "model-00001-of-00001.safetensors").write_bytes(b"weights of a week")
    (trained / "notes.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in trained.iterdir()}
    proc = tune(*DEMO, f"output_dir={tmp_path / 'run'}", f"checkpoint_dir={trained}", check=False)
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"FileExistsError: checkpoint_dir {trained} holds " in err, err[-3000:]
    assert "prepare_checkpoint=null" in err
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == before


def test_a_second_run_at_once_is_refused_naming_the_first(tune, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torchtune._cli.tune", *DEMO, f"output_dir={out}", *QUIET, "max_steps_per_epoch=12"]
    first = subprocess.Popen(cmd, env=tune_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "run.json").is_file():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.5)
        # held still, lock and all: however slow this machine, the first run cannot finish before the second asks
        os.killpg(first.pid, signal.SIGSTOP)
        proc = tune(*DEMO, f"output_dir={out}", *QUIET, "max_steps_per_epoch=1", check=False)
        err = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert f"OutputDirInUseError: output_dir {out} is in use by run {_run_id(out)}" in err, err[-3000:]
        assert f"pid {first.pid}" in err
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a crash: the lock goes with the process
        first.wait()
    assert not (out / "epoch_0").exists()  # killed before any save
    tune(*DEMO, f"output_dir={out}", *QUIET, "max_steps_per_epoch=1")
    assert (out / "epoch_0").is_dir()


def test_the_lora_recipe_has_the_same_protection(tune, tmp_path):
    lora = ["run", "lora_finetune_distributed", "--config", "mistral3p5_medpix_lora_demo", *QUIET,
            "save_merged_model=False"]
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "adapter_config.json").write_text("{}")
    proc = tune(*lora, f"output_dir={tmp_path / 'refused'}", f"checkpoint_dir={trained}", check=False)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert f"FileExistsError: checkpoint_dir {trained} holds " in proc.stderr
    assert [p.name for p in trained.iterdir()] == ["adapter_config.json"]

    out = tmp_path / "run"
    first = [*lora, f"output_dir={out}", "max_steps_per_epoch=2", "save_every_n_steps=1"]
    tune(*first)
    good = _digests(out)
    proc = tune(*first, check=False)
    assert proc.returncode != 0 and f"OutputDirTakenError: output_dir {out} holds the work of run" in proc.stderr
    proc = tune(*first, "resume_from_checkpoint=True", "batch_size=1", "model.lora_rank=4", check=False)
    assert proc.returncode != 0 and "batch_size: 2 -> 1" in proc.stderr, proc.stderr[-3000:]
    assert "model.lora_rank: 8 -> 4" in proc.stderr
    assert _digests(out) == good
