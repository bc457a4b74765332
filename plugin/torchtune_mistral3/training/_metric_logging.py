"""Metric-logger set-up: an unwritable log directory stops the run once, clearly; no W&B login never does."""

import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

log = logging.getLogger(__name__)


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def check_log_dir_writable(log_dir: Optional[str]) -> None:
    """Create ``log_dir`` and write a file in it, so an unwritable ``output_dir`` fails before any logger exists.

    torchtune's ``DiskLogger`` would fail inside its constructor and then again in ``__del__``
    (``AttributeError: 'DiskLogger' object has no attribute '_file'``), hiding the real error.

    Args:
        log_dir (Optional[str]): the logger's directory; None (a logger without one) is not checked.

    Raises:
        OSError: (its subclass for the cause: ``PermissionError``, ``NotADirectoryError`` ...) naming the
            directory and what to change.
    """
    if log_dir is None:
        return
    directory = Path(log_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise type(e)(
            f"Cannot write logs to {directory} ({e.strerror or e}): output_dir (and metric_logger.log_dir, "
            f"default ${{output_dir}}/logs) must be a directory this user can create and write. Choose another "
            f"output_dir=... or fix the permissions."
        ) from None


def prepare_metric_logger_env(cfg_metric_logger: DictConfig) -> None:
    """Before the metric logger is built: check its directory; W&B without a key runs offline, with a hint.

    Args:
        cfg_metric_logger (DictConfig): the ``metric_logger`` section of the config.

    Raises:
        ImportError: if the config asks for W&B and ``wandb`` is not installed (the message names the extra).
        OSError: if the logger's ``log_dir`` cannot be created or written (see :func:`check_log_dir_writable`).
    """
    log_dir = cfg_metric_logger.get("log_dir", None)
    check_log_dir_writable(log_dir)
    if not str(cfg_metric_logger.get("_component_", "")).endswith("WandBLogger"):
        return
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "metric_logger is WandBLogger but wandb is not installed: pip install 'torchtune-mistral3[wandb]', "
            "or choose metric_logger._component_=torchtune.training.metric_logging.DiskLogger"
        ) from e
    if "WANDB_MODE" not in os.environ and not _wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
        # WandBLogger passes log_dir (or `dir`) to wandb.init(dir=...), which writes <dir>/wandb/offline-run-*
        wandb_dir = Path(cfg_metric_logger.get("dir", None) or log_dir or ".") / "wandb"
        log.warning(
            "No W&B API key found (WANDB_API_KEY or ~/.netrc): logging to W&B offline. "
            f"Upload later with `wandb sync {wandb_dir}/offline-run-*`."
        )
