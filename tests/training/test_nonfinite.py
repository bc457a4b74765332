"""The non-finite step guard and the save guard, in a one-process gloo group (the run tests are in
tests/recipes/test_run_faults.py)."""

import math

import pytest
import torch
import torch.distributed as dist
from torchtune_mistral3.training import NonFiniteError, NonFiniteGuard, check_finite_for_save

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def world_of_one(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model():
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    return model


def test_finite_step_is_applied():
    guard = NonFiniteGuard(0, ".")
    model = _model()
    assert guard.step_is_finite(step=1, loss=2.0, grad_norm=1.0, parameters=model.parameters(), rows=[0], device=CPU)


def test_nonfinite_steps_are_skipped_up_to_the_limit_then_stop(tmp_path, caplog):
    guard = NonFiniteGuard(1, str(tmp_path))
    params = list(_model().parameters())
    assert not guard.step_is_finite(step=3, loss=math.nan, grad_norm=1.0, parameters=params, rows=[5, 6], device=CPU)
    assert "Step 3 is not finite (loss=nan, grad_norm=1.0) on dataset rows [5, 6]: skipped" in caplog.text
    with pytest.raises(NonFiniteError) as e:
        guard.step_is_finite(step=4, loss=1.0, grad_norm=math.inf, parameters=params, rows=[7], device=CPU)
    msg = str(e.value)
    assert "Step 4 is not finite (loss=1.0, grad_norm=inf) on dataset rows [7]; steps skipped before: [3]" in msg
    assert f"no training state was saved in {tmp_path} yet" in msg


def test_without_clipping_the_gradients_themselves_are_checked():
    guard = NonFiniteGuard(0, ".")
    model = _model()
    model.bias.grad[0] = math.nan
    with pytest.raises(NonFiniteError, match="gradients non-finite"):
        guard.step_is_finite(step=1, loss=1.0, grad_norm=None, parameters=model.parameters(), rows=[], device=CPU)


def test_save_is_refused_for_nonfinite_weights_or_optimizer_state():
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    check_finite_for_save([model], opt, CPU)
    opt.state[model.weight]["exp_avg_sq"][0, 0] = math.inf
    with pytest.raises(NonFiniteError, match=r"optimizer state exp_avg_sq of weight"):
        check_finite_for_save([model], opt, CPU)
    opt.state[model.weight]["exp_avg_sq"].zero_()
    with torch.no_grad():
        model.bias[1] = math.nan
    with pytest.raises(NonFiniteError, match=r"rank 0 holds \['bias'\]"):
        check_finite_for_save([model], opt, CPU)


def test_negative_limit_is_refused():
    with pytest.raises(ValueError, match="max_nonfinite_steps must be a non-negative integer"):
        NonFiniteGuard(-1, ".")
