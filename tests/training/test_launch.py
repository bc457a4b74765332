import os

import pytest
from torchtune_mistral3.training import (
    check_checkpoint_dir,
    check_world_size,
    command_line_overrides,
    ensure_single_process_env,
)


def test_world_size_that_holds_the_layout_gives_the_data_parallel_rest():
    layout = {"tensor_parallel_dim": 2, "pipeline_parallel_dim": 2}
    assert check_world_size(layout, config_name="x", world_size=8).dp == 2
    assert check_world_size({}, config_name="x", world_size=1).dp == 1


def test_too_few_processes_names_the_tune_run_flags():
    with pytest.raises(ValueError) as e:
        check_world_size({"tensor_parallel_dim": 8, "pipeline_parallel_dim": 8}, config_name="mistral3p5_medpix",
                         world_size=1)
    msg = str(e.value)
    assert "8 x 8 = 64 processes, but 1 was launched" in msg
    assert "tune run --nproc_per_node 8 --nnodes 8" in msg and "--config mistral3p5_medpix" in msg
    with pytest.raises(ValueError, match="--nproc_per_node 2 full_finetune_distributed"):
        check_world_size({"tensor_parallel_dim": 2}, config_name="c", world_size=3)


def test_suggested_command_keeps_the_overrides():
    argv = ["/x/recipe.py", "--config", "/x/demo.yaml", "optimizer.lr=1e-4", "dataset.data_files=a b"]
    overrides = command_line_overrides(argv)
    assert overrides == ["optimizer.lr=1e-4", "dataset.data_files=a b"]
    with pytest.raises(ValueError) as e:
        check_world_size({"tensor_parallel_dim": 2}, config_name="demo", world_size=1, overrides=overrides)
    assert "tune run --nproc_per_node 2 full_finetune_distributed --config demo optimizer.lr=1e-4 " in str(e.value)
    assert "'dataset.data_files=a b'\n" in str(e.value)


def test_single_process_env_is_filled_only_when_missing(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert ensure_single_process_env() is True
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert int(os.environ["MASTER_PORT"]) > 0
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert ensure_single_process_env() is False and os.environ["RANK"] == "3"


def test_missing_checkpoint_gives_the_download_command(tmp_path):
    missing = tmp_path / "Mistral-Medium-3.5-128B"
    with pytest.raises(FileNotFoundError) as e:
        check_checkpoint_dir(str(missing), "mistralai/Mistral-Medium-3.5-128B")
    assert f"tune download mistralai/Mistral-Medium-3.5-128B --output-dir {missing}" in str(e.value)
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        check_checkpoint_dir(str(missing), None)
    (missing / "config.json").write_text("{}")
    check_checkpoint_dir(str(missing), None)


def test_a_run_directory_given_as_checkpoint_suggests_its_newest_epoch(tmp_path):
    run = tmp_path / "run"
    for name in ("epoch_2", "epoch_10", "epoch_11", "epoch_x", "logs"):
        (run / name).mkdir(parents=True)
    for name in ("epoch_2", "epoch_10"):  # epoch_11 is incomplete (no config.json): not suggested
        (run / name / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as e:
        check_checkpoint_dir(str(run), None)
    assert f"it is a run's output_dir, whose newest checkpoint is {run / 'epoch_10'}" in str(e.value)
    assert f"set checkpoint_dir={run / 'epoch_10'}" in str(e.value)
