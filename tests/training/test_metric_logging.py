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
