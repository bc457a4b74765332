import math

import pytest
import torch
from torchtune_mistral3.training import cosine_with_warmup


def _lrs(n, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
    sched = cosine_with_warmup(opt, **kw)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_from_a_tenth_then_cosine_to_min_lr_like_the_reference_recipe():
    # NeMo AutoModel's MM3.5 recipe: 10 linear warm-up steps from 0.1*lr, then cosine from lr to 1e-6 (hand
    # formula); optimizer step n (1-based) runs at the warm-up value after n steps, so step 1 already trains.
    lrs = _lrs(100, num_warmup_steps=10, num_training_steps=100, min_lr=1e-6, warmup_start_factor=0.1)
    for n in range(1, 11):
        assert lrs[n - 1] == pytest.approx(1e-6 + (1e-5 - 1e-6) * n / 10, rel=1e-9)
    for n in range(11, 101):
        progress = (n - 10) / 90
        expected = 1e-6 + (1e-5 - 1e-6) * 0.5 * (1 + math.cos(math.pi * progress))
        assert lrs[n - 1] == pytest.approx(expected, rel=1e-9)
    assert lrs[9] == pytest.approx(1e-5) and lrs[99] == pytest.approx(1e-6)


def test_first_step_of_a_warmup_from_zero_trains():
    # warm-up from 0 over 4 steps: the steps run at lr/4, lr/2, 3lr/4, lr (never at 0)
    lrs = _lrs(4, num_warmup_steps=4, num_training_steps=8, min_lr=0.0)
    assert lrs == pytest.approx([2.5e-6, 5e-6, 7.5e-6, 1e-5], rel=1e-12)


def test_min_lr_above_peak_is_refused():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
    with pytest.raises(ValueError, match="min_lr"):
        cosine_with_warmup(opt, num_warmup_steps=1, num_training_steps=10, min_lr=1e-4)
