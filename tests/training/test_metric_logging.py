import os

import pytest
from omegaconf import OmegaConf
from torchtune_mistral3.training import prepare_metric_logger_env

WANDB = OmegaConf.create({"_component_": "torchtune.training.metric_logging.WandBLogger", "project": "p"})


def test_disk_logger_is_left_alone(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    prepare_metric_logger_env(OmegaConf.create({"_component_": "torchtune.training.metric_logging.DiskLogger"}))
    assert "WANDB_MODE" not in os.environ


def test_wandb_without_a_key_goes_offline(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    prepare_metric_logger_env(WANDB)
    assert os.environ["WANDB_MODE"] == "offline"


def test_wandb_with_a_key_stays_online(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    prepare_metric_logger_env(WANDB)
    assert "WANDB_MODE" not in os.environ


def test_missing_wandb_package_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ImportError, match=r"torchtune-mistral3\[wandb\]"):
        prepare_metric_logger_env(WANDB)


def test_offline_hint_names_the_directory_wandb_writes(monkeypatch, tmp_path, caplog):
    pytest.importorskip("wandb")
    import glob
    import re

    from torchtune.training.metric_logging import WandBLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_dir = tmp_path / "out" / "logs"
    cfg = OmegaConf.create({**WANDB, "log_dir": str(log_dir)})
    prepare_metric_logger_env(cfg)
    (command,) = re.findall(r"`wandb sync ([^`]+)`", caplog.text)
    logger = WandBLogger(project="p", log_dir=str(log_dir))
    logger.log("loss", 1.0, step=1)
    logger.close()
    runs = glob.glob(command)
    assert len(runs) == 1 and runs[0].startswith(str(log_dir / "wandb" / "offline-run-"))


def test_unwritable_output_dir_fails_once_naming_it(tmp_path):
    import subprocess
    import sys

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    log_dir = blocker / "run" / "logs"  # a directory under a regular file cannot exist, even for root
    code = (
        "from omegaconf import OmegaConf\n"
        "from torchtune import config\n"
        "from torchtune_mistral3.training import prepare_metric_logger_env\n"
        "cfg = OmegaConf.create({'_component_': 'torchtune.training.metric_logging.DiskLogger',\n"
        f"                       'log_dir': '{log_dir}'}})\n"
        "prepare_metric_logger_env(cfg)\n"
        "logger = config.instantiate(cfg)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"NotADirectoryError: Cannot write logs to {log_dir} (Not a directory)" in proc.stderr
    assert proc.stderr.count("Error") == 1, proc.stderr  # no second error from DiskLogger.__del__
