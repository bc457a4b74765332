"""The run picture: metrics read back from torchtune's own DiskLogger files, and the PNG."""

import subprocess
import sys
import time

import pytest
from torchtune.training.metric_logging import DiskLogger
from torchtune_mistral3.plot import read_metric_log


def _log(output_dir, steps):
    logger = DiskLogger(log_dir=str(output_dir / "logs"))
    for step, metrics in steps:
        logger.log_dict(metrics, step=step)
    logger.close()
    time.sleep(1.1)  # DiskLogger names its file by the second


@pytest.fixture
def run(tmp_path):
    _log(tmp_path, [(s, {"loss": 3.0 - 0.1 * s, "lr": 1e-3 * s, "grad_norm": 1.0}) for s in (1, 2, 3)])
    _log(tmp_path, [(3, {"loss": 2.5, "lr": 2e-3, "val_loss": 2.75}), (4, {"loss": 2.4, "lr": 1e-3})])  # resumed
    return tmp_path


def test_metrics_round_trip_through_disklogger_and_a_resume_wins(run):
    metrics = read_metric_log(run)
    assert metrics["loss"] == [(1, pytest.approx(2.9)), (2, pytest.approx(2.8)), (3, 2.5), (4, 2.4)]
    assert metrics["val_loss"] == [(3, 2.75)]
    assert [s for s, _ in metrics["lr"]] == [1, 2, 3, 4]


def test_command_writes_a_png(run):
    proc = subprocess.run([sys.executable, "-m", "torchtune_mistral3.plot", str(run)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    png = run / "loss_curve.png"
    assert proc.stdout.strip() == str(png)
    from PIL import Image

    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (700, 640)  # two panels, 7 x 6.4 in at 100 dpi
        assert len(set(image.convert("RGB").getdata())) > 10  # lines were drawn, not a blank canvas


def test_missing_log_names_the_folder_and_the_key(tmp_path):
    cmd = [sys.executable, "-m", "torchtune_mistral3.plot", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1
    assert f"no metric log (*.txt) in {tmp_path / 'logs'}" in proc.stderr and "DiskLogger" in proc.stderr
