"""Two torchrun agents (two "nodes", one process each) meeting in a c10d rendezvous on loopback, through
`tune run`, train exactly as one agent with two processes."""

import os
import re
import subprocess
import sys

import pytest
from _cluster_runs import DEMO, OVERRIDES, STEPS, free_port, logged_losses

pytestmark = pytest.mark.integration


def test_two_agents_with_c10d_rendezvous_equal_one_two_process_run(uninterrupted_losses, tmp_path):
    two = tmp_path / "two_agents"

    port = free_port()
    agent = [sys.executable, "-m", "torchtune._cli.tune", "run", "--nnodes", "2", "--nproc_per_node", "1",
             "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-agents",
             "full_finetune_distributed", *DEMO, f"output_dir={two}", *OVERRIDES,
             # both "nodes" are this machine, so its local disk is shared by them
             "assume_shared_output_dir=True"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(agent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]  # fmt: skip
    outputs = [a.communicate(timeout=900)[0] for a in agents]
    for a, out in zip(agents, outputs):
        assert a.returncode == 0, out
    # two "nodes" of one job: each agent ran one rank of a world of 2 (every rank reports what it holds)
    ranks = [re.findall(r"Rank (\d+) \(pp/dp/tp coordinate \(0, (\d+), 0\)\)", out) for out in outputs]
    assert sorted(ranks) == [[("0", "0")], [("1", "1")]], ranks

    a, b = uninterrupted_losses, logged_losses(two)
    assert sorted(a) == sorted(b) == STEPS
    for step in STEPS:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=0), step
    assert (two / "epoch_0" / "config.json").is_file()
