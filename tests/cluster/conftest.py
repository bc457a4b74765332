import pytest
from _cluster_runs import DEMO, OVERRIDES, STEPS, logged_losses

from tests.conftest import run_tune


@pytest.fixture(scope="session")
def uninterrupted_losses(tmp_path_factory):
    """Step -> loss of the demo run on one agent with 2 processes: what every cluster launch must reproduce."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_tune("run", "--nproc_per_node", "2", "full_finetune_distributed", *DEMO, f"output_dir={out}", *OVERRIDES)
    losses = logged_losses(out)
    assert sorted(losses) == STEPS
    return losses
