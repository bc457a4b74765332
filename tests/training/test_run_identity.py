"""A run owns its output_dir (lock, identity, refusal of another run's directory) and resume refuses what it
cannot continue exactly (issue 25, items 2 and 3)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf
from torchtune_mistral3.training import (
    OutputDirInUseError,
    OutputDirTakenError,
    check_resumable,
    claim_output_dir,
    run_identity,
)
from torchtune_mistral3.training._run_identity import LOCK_FILE, OutputDirLock, read_run_file

LAYOUT = {"world_size": 1, "pp": 1, "dp": 1, "tp": 1}


def _cfg(output_dir, **overrides):
    cfg = OmegaConf.create(
        {
            "output_dir": str(output_dir),
            "checkpoint_dir": "${output_dir}/ckpt",
            "batch_size": 2,
            "gradient_accumulation_steps": 1,
            "shuffle": True,
            "seed": 1234,
            "epochs": 1,
            "max_steps_per_epoch": 12,
            "dataset": {"_component_": "torchtune_mistral3.datasets.medpix_dataset", "data_files": None},
            "optimizer": {"_component_": "torch.optim.AdamW", "lr": 3e-3},
            "lr_scheduler": {"_component_": "torchtune_mistral3.training.cosine_with_warmup", "num_warmup_steps": 2},
            "tokenizer": {"max_seq_len": 512},
            "metric_logger": {"log_dir": "${output_dir}/logs"},
            "log_every_n_steps": 1,
            "run_val_every_n_steps": 6,
            "save_every_n_steps": None,
            "resume_from_checkpoint": False,
        }
    )
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _saved_state(tmp_path, cfg, steps_per_epoch=12, epochs_run=0, rows=24, batches=12):
    state = tmp_path / "out" / "training_state" / "step_4"
    state.mkdir(parents=True)
    record = {**run_identity(cfg, LAYOUT), "run_id": "a", "steps_per_epoch": steps_per_epoch,
              "epochs_run": epochs_run, "rows": rows, "batches_per_epoch": batches}
    (state / "run.json").write_text(json.dumps(record))
    return state


def _now(cfg, steps_per_epoch=12, rows=24, batches=12):
    return {**run_identity(cfg, LAYOUT), "steps_per_epoch": steps_per_epoch, "rows": rows, "batches_per_epoch": batches}


@pytest.mark.parametrize(
    "key, old, new",
    [
        ("batch_size", 2, 4),
        ("gradient_accumulation_steps", 1, 2),
        ("shuffle", True, False),
        ("seed", 1234, 1),
        ("epochs", 1, 2),
        ("optimizer.lr", 3e-3, 1e-3),
        ("lr_scheduler.num_warmup_steps", 2, 1),
        ("tokenizer.max_seq_len", 512, 256),
        ("dataset.packed", "<absent>", True),
    ],
)
def test_a_key_that_changes_order_schedule_or_update_is_refused_with_both_values(tmp_path, key, old, new):
    cfg = _cfg(tmp_path / "out")
    state = _saved_state(tmp_path, cfg)
    with pytest.raises(ValueError) as e:
        check_resumable(state, _now(_cfg(tmp_path / "out", **{key: new})))
    assert f"Cannot resume {state} exactly" in str(e.value)
    assert f"{key}: {old!r} -> {new!r}" in str(e.value)
    assert "docs/checkpointing.md" in str(e.value)


def test_safe_keys_and_a_moved_output_dir_resume(tmp_path):
    state = _saved_state(tmp_path, _cfg(tmp_path / "out"))
    safe = {"log_every_n_steps": 5, "run_val_every_n_steps": 1, "save_every_n_steps": 2, "metric_logger.log_dir": "/x",
            "resume_from_checkpoint": True, "max_steps_per_epoch": 100}  # 12 steps either way: the data ends first
    check_resumable(state, _now(_cfg(tmp_path / "moved", **safe)))


def test_data_rows_and_steps_per_epoch(tmp_path):
    cfg = _cfg(tmp_path / "out")
    state = _saved_state(tmp_path, cfg)
    with pytest.raises(ValueError, match=r"rows of the training data: 24 -> 20"):
        check_resumable(state, _now(cfg, rows=20, batches=10, steps_per_epoch=10))
    # max_steps_per_epoch lower: the epoch would end early
    with pytest.raises(ValueError, match=r"steps per epoch \(max_steps_per_epoch=12 -> 6\): 12 -> 6"):
        check_resumable(state, _now(_cfg(tmp_path / "out", max_steps_per_epoch=6), steps_per_epoch=6))
    # higher: the cosine schedule's length would change
    with pytest.raises(ValueError, match=r"12 -> 20"):
        check_resumable(state, _now(_cfg(tmp_path / "out", max_steps_per_epoch=20), steps_per_epoch=20))


def test_more_steps_in_the_first_epoch_of_a_constant_rate_run_resume(tmp_path):
    cfg = _cfg(tmp_path / "out", lr_scheduler=None)
    state = _saved_state(tmp_path, cfg)
    check_resumable(state, _now(_cfg(tmp_path / "out", lr_scheduler=None, max_steps_per_epoch=20), steps_per_epoch=20))
    later = tmp_path / "later"
    later_state = _saved_state(later, cfg, epochs_run=1)
    with pytest.raises(ValueError, match="12 -> 20"):  # past the first epoch the epoch boundaries would move
        check_resumable(later_state, _now(cfg, steps_per_epoch=20))


def test_changed_data_file_is_refused(tmp_path):
    data = tmp_path / "train.parquet"
    data.write_bytes(b"x" * 1000)
    cfg = _cfg(tmp_path / "out", **{"dataset.data_files": str(data)})
    state = _saved_state(tmp_path, cfg)
    check_resumable(state, _now(cfg))
    data.write_bytes(b"y" * 1000)
    with pytest.raises(ValueError, match="data files"):
        check_resumable(state, _now(cfg))


def test_fresh_run_into_another_runs_directory_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    first = claim_output_dir(_cfg(out), LAYOUT)
    (out / "epoch_0").mkdir()
    (out / "training_state" / "step_2").mkdir(parents=True)
    first.lock.release()
    with pytest.raises(OutputDirTakenError) as e:
        claim_output_dir(_cfg(out), LAYOUT)
    msg = str(e.value)
    assert f"output_dir {out} holds the work of run {first.run_id}" in msg
    assert "epoch_0, training_state/step_2" in msg
    assert "resume_from_checkpoint=True" in msg and f"output_dir={out / 'run_2'}" in msg
    assert "overwrite_output_dir=True" in msg
    assert read_run_file(out)["run_id"] == first.run_id  # the refused run recorded nothing
    resumed = claim_output_dir(_cfg(out, resume_from_checkpoint=True), LAYOUT)
    assert resumed.run_id == first.run_id and not resumed.replacing
    resumed.lock.release()
    replacing = claim_output_dir(_cfg(out, overwrite_output_dir=True), LAYOUT)
    assert replacing.replacing and replacing.run_id != first.run_id
    assert read_run_file(out)["replaces"] == {"run": first.run_id, "files": ["epoch_0", "training_state/step_2"]}
    assert (out / "epoch_0").is_dir()  # kept until this run's first save is complete
    replacing.delete_replaced_checkpoints(keep=out / "epoch_9")
    assert not (out / "epoch_0").exists()
    replacing.lock.release()


def test_identity_records_config_layout_data_and_batch(tmp_path):
    out = tmp_path / "out"
    claim = claim_output_dir(_cfg(out, gradient_accumulation_steps=3), {**LAYOUT, "world_size": 4, "dp": 4})
    record = read_run_file(out)
    assert record["run_id"] == claim.run_id and record["pid"] == os.getpid()
    assert record["config"]["checkpoint_dir"] == "${output_dir}/ckpt"
    assert record["layout"]["dp"] == 4
    assert record["batch"] == {"batch_size": 2, "gradient_accumulation_steps": 3, "data_parallel": 4,
                               "global_batch": 24}
    claim.lock.release()


_HOLD = """
import sys, time
from omegaconf import OmegaConf
from torchtune_mistral3.training import claim_output_dir
claim = claim_output_dir(OmegaConf.create({"output_dir": sys.argv[1], "batch_size": 1}), {"dp": 1})
print("locked", flush=True)
time.sleep(600)
"""


def test_a_running_run_is_named_and_its_lock_dies_with_it(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirInUseError) as e:
            claim_output_dir(_cfg(out), LAYOUT)
        assert f"pid {holder.pid}" in str(e.value) and str(out / LOCK_FILE) in str(e.value)
        with pytest.raises(OutputDirInUseError):  # resuming is refused too: the run is still writing
            claim_output_dir(_cfg(out, resume_from_checkpoint=True), LAYOUT)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # a killed holder releases its lock: the next run starts (the directory holds no saved work)
    claim = claim_output_dir(_cfg(out), LAYOUT)
    assert read_run_file(out)["pid"] == os.getpid()
    claim.lock.release()


def test_release_lets_the_next_run_lock(tmp_path):
    lock = OutputDirLock(tmp_path)
    assert lock.acquire({"pid": 1})
    other = OutputDirLock(tmp_path)
    with pytest.raises(OutputDirInUseError):
        other.acquire({"pid": 2})
    lock.release()
    start = time.monotonic()
    assert other.acquire({"pid": 2}) and time.monotonic() - start < 1
    other.release()


def test_data_files_of_a_dataset_list_are_fingerprinted(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.json"
    a.write_bytes(b"a" * 10)
    b.write_bytes(b"b" * (3 << 20))  # beyond the hashed head and tail
    cfg = _cfg(tmp_path / "out")
    cfg.dataset = [{"_component_": "x", "data_files": str(a)}, {"_component_": "y", "data_files": {"train": [str(b)]}}]
    files = run_identity(cfg, LAYOUT)["data_files"]
    assert sorted(files) == [str(a), str(b)]
    assert files[str(b)]["bytes"] == 3 << 20
