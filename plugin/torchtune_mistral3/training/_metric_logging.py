"""Metric-logger set-up that never blocks a run on a missing W&B login."""

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def prepare_metric_logger_env(cfg_metric_logger: DictConfig) -> None:
    """Before a W&B logger is built: run offline when there is no key, and say how to sync later.

    Args:
        cfg_metric_logger (DictConfig): the ``metric_logger`` section of the config.

    Raises:
        ImportError: if the config asks for W&B and ``wandb`` is not installed (the message names the extra).
    """
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
        log.warning(
            "No W&B API key found (WANDB_API_KEY or ~/.netrc): logging to W&B offline. "
            "Upload later with `wandb sync <output_dir>/wandb/offline-run-*`."
        )
