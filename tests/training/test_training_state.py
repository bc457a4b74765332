"""Training states: restricted unpickling, a damaged newest state, a failed write (one process, gloo)."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchtune_mistral3.training._training_state import (
    UnsafeTrainingStateError,
    latest_training_state,
    load_training_state,
    save_training_state,
)

LAYOUT = {"world_size": 1, "pp": 1, "dp": 1, "tp": 1}


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(output_dir, step, seed):
    model, optimizer = _model_and_optimizer(seed)
    extra = {"global_step": step, "epochs_run": 0, "dataloader": {"_num_yielded": step}, "lr_scheduler": None}
    save_training_state(output_dir, step, layout=LAYOUT, model_parts=[model], optimizer=optimizer, extra=extra)
    return model


def _load(output_dir):
    model, optimizer = _model_and_optimizer(99)
    directory, extra = load_training_state(output_dir, layout=LAYOUT, model_parts=[model], optimizer=optimizer)
    return directory, extra, model


class _WritesAFile:
    """What a tampered state could carry: unpickling it calls ``open(path, "w")``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_state_with_code_is_refused_and_runs_nothing(process_group, tmp_path):
    _save(tmp_path, 1, seed=0)
    marker = tmp_path / "code_ran"
    path = tmp_path / "training_state" / "step_1" / "rank_00000.pt"
    torch.save({"model": [], "extra": _WritesAFile(marker)}, path)
    with pytest.raises(UnsafeTrainingStateError, match=f"{path} holds objects other than tensors"):
        _load(tmp_path)
    assert not marker.exists()


def test_truncated_newest_state_falls_back_to_the_previous(process_group, tmp_path, caplog):
    first = _save(tmp_path, 1, seed=1)
    _save(tmp_path, 2, seed=2)
    newest = tmp_path / "training_state" / "step_2" / "rank_00000.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        directory, extra, model = _load(tmp_path)
    assert directory == tmp_path / "training_state" / "step_1"
    assert extra["global_step"] == 1
    assert torch.equal(model.weight, first.weight) and torch.equal(model.bias, first.bias)
    warning = caplog.text
    assert f"Skipping training state {newest.parent}: {newest} cannot be read" in warning
    assert "damaged" in warning and "Resuming from the previous complete training state" in warning


def test_no_readable_state_names_every_file(process_group, tmp_path):
    _save(tmp_path, 1, seed=1)
    path = tmp_path / "training_state" / "step_1" / "rank_00000.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match=f"No training state .* is readable: {path} cannot be read"):
        _load(tmp_path)


# Run in a child: RLIMIT_FSIZE makes every write past 64 KiB fail (EFBIG; Python ignores SIGXFSZ), the way a
# full disk fails the same torch.save call.
_FILE_SIZE_LIMITED_SAVE = textwrap.dedent(
    """
    import resource, sys
    import torch, torch.distributed as dist
    from torch import nn
    from torchtune_mistral3.training._training_state import save_training_state

    out = sys.argv[1]
    dist.init_process_group("gloo", init_method=f"file://{out}/pg", rank=0, world_size=1)
    layout = {"world_size": 1}
    small = nn.Linear(4, 4)
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    save_training_state(out, 1, layout=layout, model_parts=[small], optimizer=opt, extra={})
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
    big = nn.Linear(256, 256)
    opt = torch.optim.SGD(big.parameters(), lr=0.1)
    save_training_state(out, 2, layout=layout, model_parts=[big], optimizer=opt, extra={})
    """
)


def test_failed_write_names_the_file_and_keeps_the_previous_state(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _FILE_SIZE_LIMITED_SAVE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0
    root = tmp_path / "training_state"
    failed = f"{root}/.step_2.partial/rank_00000.pt"
    assert f"OSError: Writing the training state of step 2 failed (is the disk full?): {failed}" in proc.stderr
    assert f"the previous state {root}/step_1 is intact" in proc.stderr
    assert sorted(p.name for p in root.iterdir()) == ["step_1"]
    assert latest_training_state(tmp_path) == root / "step_1"
    assert torch.load(root / "step_1" / "rank_00000.pt", weights_only=True)["extra"] == {}


def test_unreadable_layout_file_counts_as_damage(process_group, tmp_path):
    _save(tmp_path, 1, seed=1)
    _save(tmp_path, 2, seed=2)
    (tmp_path / "training_state" / "step_2" / "layout.json").write_text('{"world_si')
    directory, extra, _ = _load(tmp_path)
    assert directory.name == "step_1" and extra["global_step"] == 1


def _partly_frozen(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_frozen_parameters_stay_out_of_the_state_and_keep_their_loaded_values(process_group, tmp_path):
    saved_model, optimizer = _partly_frozen(0)
    parts = [saved_model]
    directory = save_training_state(tmp_path, 1, layout=LAYOUT, model_parts=parts, optimizer=optimizer, extra={})
    on_disk = torch.load(next(directory.glob("rank_*.pt")), weights_only=False)
    assert set(on_disk["model"][0]) == {"1.weight", "1.bias"}  # the frozen layer is not written
    resumed, optimizer = _partly_frozen(1)  # what the checkpoint loaded at set-up, here other values
    frozen_before = resumed[0].weight.clone()
    load_training_state(tmp_path, layout=LAYOUT, model_parts=[resumed], optimizer=optimizer)
    assert torch.equal(resumed[1].weight, saved_model[1].weight)
    assert torch.equal(resumed[0].weight, frozen_before)
    # a run that now trains what the saved run kept frozen cannot take its state
    unfrozen, optimizer = _partly_frozen(2)
    unfrozen[0].requires_grad_(True)
    with pytest.raises(ValueError, match=r"no saved value for the trainable \['0.weight', '0.bias'\]"):
        load_training_state(tmp_path, layout=LAYOUT, model_parts=[unfrozen], optimizer=optimizer)


def _save_for_run(output_dir, step, run_id, replace_other_runs=False):
    model, optimizer = _model_and_optimizer(step)
    extra = {"global_step": step, "epochs_run": 0, "dataloader": None, "lr_scheduler": None}
    save_training_state(output_dir, step, layout=LAYOUT, model_parts=[model], optimizer=optimizer, extra=extra,
                        run_record={"run_id": run_id}, replace_other_runs=replace_other_runs)


def _steps(output_dir):
    return sorted(int(p.name[5:]) for p in (output_dir / "training_state").iterdir() if p.name.startswith("step_"))


def test_retention_never_deletes_this_runs_state_to_keep_another_runs(process_group, tmp_path):
    # an older run reached steps 10 and 12; a new run in the same output_dir saves steps 1, 2, 3
    for step in (10, 12):
        _save_for_run(tmp_path, step, "old")
    for step in (1, 2, 3):
        _save_for_run(tmp_path, step, "new")
    assert _steps(tmp_path) == [2, 3, 10, 12]  # the new run's 2 newest are kept; the old run's are not its to delete
    # overwrite_output_dir=True: the old run's states go once the new run's state is complete
    _save_for_run(tmp_path, 4, "new", replace_other_runs=True)
    assert _steps(tmp_path) == [3, 4]
    assert json.loads((tmp_path / "training_state" / "step_4" / "run.json").read_text()) == {"run_id": "new"}


def test_resume_check_runs_before_the_state_is_read(process_group, tmp_path):
    _save(tmp_path, 1, seed=1)
    model, optimizer = _model_and_optimizer(99)
    before = model.weight.detach().clone()

    def refuse(directory):
        raise ValueError(f"Cannot resume {directory} exactly: batch_size: 2 -> 4")

    with pytest.raises(ValueError, match="batch_size: 2 -> 4"):
        load_training_state(tmp_path, layout=LAYOUT, model_parts=[model], optimizer=optimizer, check=refuse)
    assert torch.equal(model.weight, before)


def test_load_restores_the_random_state_of_the_save(process_group, tmp_path):
    import random

    _save(tmp_path, 2, seed=0)  # the draws after the save are the ones the resumed run must repeat
    expected = (torch.rand(3), random.random(), nn.Dropout(0.5)(torch.ones(8)))
    torch.manual_seed(123)  # a resumed process starts elsewhere
    random.seed(123)
    _load(tmp_path)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert torch.equal(nn.Dropout(0.5)(torch.ones(8)), expected[2])
