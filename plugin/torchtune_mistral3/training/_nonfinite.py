"""Stop (or skip) a training step whose loss or gradients are not finite, and never save non-finite weights.

A NaN that reaches the optimizer turns every weight into NaN, and every later checkpoint with it. Both checks
are collective: each rank contributes a flag, one all-reduce decides, so all ranks take the same branch and no
rank waits in a collective that the others skipped.
"""

import logging
import math
from typing import Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from ._training_state import latest_training_state

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A training step or a save met a NaN or an infinity."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _any_rank(flag: bool, device: torch.device, group: Optional[dist.ProcessGroup] = None) -> bool:
    """True on every rank when ``flag`` is True on at least one rank of ``group`` (default: the world)."""
    t = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _all_rows(rows: Sequence[int]) -> List[int]:
    """The dataset rows of this step on all ranks (ranks of one tensor/pipeline group repeat theirs)."""
    gathered: List[Optional[List[int]]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(rows))
    return sorted({r for part in gathered for r in part or []})


def _last_good_state(output_dir: str) -> str:
    state = latest_training_state(output_dir)
    if state is None:
        return f"no training state was saved in {output_dir} yet (save_every_n_steps=N writes them)"
    return f"the newest training state on disk, untouched, is {state} (resume_from_checkpoint=True continues from it)"


class NonFiniteGuard:
    """Decide, the same way on every rank, whether an optimizer step may be applied.

    A step whose global loss or gradient norm is NaN or infinite (or, without gradient clipping, one whose
    local gradients are) is skipped up to ``max_nonfinite_steps`` times in the run: no optimizer step, the
    gradients are dropped, a warning names the step and the dataset rows. One more stops the run with
    :class:`NonFiniteError` before anything is saved.

    Args:
        max_nonfinite_steps (int): non-finite steps the run may skip before it stops. Default is 0.
        output_dir (str): the run's ``output_dir``, to name the last good training state. Default is ".".
    """

    def __init__(self, max_nonfinite_steps: int = 0, output_dir: str = ".") -> None:
        if not isinstance(max_nonfinite_steps, int) or max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be a non-negative integer, got {max_nonfinite_steps!r}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.output_dir = output_dir
        self.skipped: List[int] = []

    def step_is_finite(
        self,
        *,
        step: int,
        loss: float,
        grad_norm: Optional[float],
        parameters: Iterable[torch.Tensor],
        rows: Sequence[int],
        device: torch.device,
    ) -> bool:
        """Whether to apply optimizer step ``step``; collective (call on every rank).

        Args:
            step (int): the 1-based number of the step being taken.
            loss (float): its loss, already reduced over all ranks.
            grad_norm (Optional[float]): its global gradient norm, None when the recipe does not clip.
            parameters (Iterable[torch.Tensor]): the trainable parameters (their gradients are checked when
                ``grad_norm`` is None).
            rows (Sequence[int]): the dataset rows of this rank's micro-batches.
            device (torch.device): device of the collective.

        Returns:
            bool: True if the step is finite; False if it must be skipped (the caller drops the gradients).

        Raises:
            NonFiniteError: if the step is not finite and ``max_nonfinite_steps`` skips are used up.
        """
        bad = not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm))
        if grad_norm is None and not bad:
            bad = any(p.grad is not None and not torch.isfinite(_local(p.grad)).all() for p in parameters)
        if not _any_rank(bad, device):
            return True
        all_rows = _all_rows(rows)
        what = f"loss={loss}" + (f", grad_norm={grad_norm}" if grad_norm is not None else ", gradients non-finite")
        if len(self.skipped) < self.max_nonfinite_steps:
            self.skipped.append(step)
            log.warning(
                f"Step {step} is not finite ({what}) on dataset rows {all_rows}: skipped, no optimizer step "
                f"({len(self.skipped)} of max_nonfinite_steps={self.max_nonfinite_steps} skips used)"
            )
            return False
        skipped = f"; steps skipped before: {self.skipped}" if self.skipped else ""
        raise NonFiniteError(
            f"Step {step} is not finite ({what}) on dataset rows {all_rows}{skipped}. The run stops before the "
            f"non-finite update reaches the weights or any checkpoint: {_last_good_state(self.output_dir)}. "
            "Lower optimizer.lr or check those rows; max_nonfinite_steps=N skips up to N such steps instead."
        )


def check_finite_for_save(model_parts: Sequence[nn.Module], optimizer: Optimizer, device: torch.device) -> None:
    """Refuse to save when any rank holds a non-finite trainable weight or optimizer state; collective.

    Args:
        model_parts (Sequence[nn.Module]): this rank's model (or pipeline stages).
        optimizer (Optimizer): the optimizer over their parameters.
        device (torch.device): device of the collective.

    Raises:
        NonFiniteError: if a parameter or an optimizer-state tensor is NaN or infinite on some rank; the
            message names this rank's first offending tensors.
    """
    # frozen weights (e.g. a LoRA recipe's FP8 base) are what was loaded: training changes only trainable ones
    bad = [
        n
        for part in model_parts
        for n, p in part.named_parameters()
        if p.requires_grad and not torch.isfinite(_local(p)).all()
    ]
    names = {id(p): n for part in model_parts for n, p in part.named_parameters()}
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(_local(v)).all():
                bad.append(f"optimizer state {k} of {names.get(id(p), '?')}")
    if _any_rank(bool(bad), device):
        here = f"rank {dist.get_rank()} holds {bad[:5]}" if bad else "another rank holds them"
        raise NonFiniteError(
            f"Not saving: the weights or optimizer state are not finite ({here}). Nothing was written, so every "
            "checkpoint and training state already on disk is intact. Lower optimizer.lr or check the data."
        )
