"""Learning-rate schedules torchtune 0.6.1 lacks."""

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_warmup(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    min_lr: float = 0.0,
    warmup_start_factor: float = 0.0,
    last_epoch: int = -1,
) -> LambdaLR:
    """Linear warm-up then cosine decay to ``min_lr`` (not to zero, unlike torchtune's cosine schedule).

    Optimizer step ``n`` (1-based) uses the factor ``warmup_start_factor + (1 - warmup_start_factor) * n /
    num_warmup_steps`` during warm-up (``n <= num_warmup_steps``), so the first step already trains (the
    schedule starts from ``warmup_start_factor * lr`` before step 1, not at step 1) and step
    ``num_warmup_steps`` runs at ``lr``; the later steps follow half a cosine from ``lr`` down to ``min_lr``,
    reached at step ``num_training_steps``, and stay there.

    Args:
        optimizer (Optimizer): optimizer whose groups' ``lr`` is the peak learning rate.
        num_warmup_steps (int): number of warm-up steps.
        num_training_steps (int): total number of optimizer steps.
        min_lr (float): final learning rate (absolute). Default is 0.0.
        warmup_start_factor (float): learning-rate factor the warm-up starts from (before step 1). Default is 0.0.
        last_epoch (int): index of the last step, for resuming. Default is -1.

    Returns:
        LambdaLR: the scheduler.

    Raises:
        ValueError: if ``min_lr`` exceeds a group's learning rate.
    """
    peak = [group["lr"] for group in optimizer.param_groups]
    if any(min_lr > lr for lr in peak):
        raise ValueError(f"min_lr={min_lr} is larger than the optimizer's learning rate {max(peak)}")

    def factor(done: int, peak_lr: float) -> float:
        step = done + 1  # LambdaLR passes the number of steps done; this is the rate of the next one
        if step <= num_warmup_steps:
            return warmup_start_factor + (1.0 - warmup_start_factor) * step / num_warmup_steps
        progress = min(1.0, (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps))
        floor = min_lr / peak_lr if peak_lr > 0 else 0.0
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, [lambda s, p=p: factor(s, p) for p in peak], last_epoch)
