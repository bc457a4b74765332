from ._launch import check_world_size, ensure_single_process_env
from ._lr_schedulers import cosine_with_warmup
from ._metric_logging import prepare_metric_logger_env
from ._stock import load_stock_recipe, stock_recipe_path

__all__ = [
    "check_world_size",
    "cosine_with_warmup",
    "ensure_single_process_env",
    "load_stock_recipe",
    "prepare_metric_logger_env",
    "stock_recipe_path",
]
