import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# What a launcher (torchrun, Slurm, or a recipe run in this process) sets for its ranks. A `tune` started from
# a test is its own launch: inheriting them would give two concurrent runs the same MASTER_PORT.
LAUNCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID")


def tune_env(env=None):
    """The environment of a `tune` started from a test: this one's, less any launcher's rank variables."""
    full_env = {k: v for k, v in os.environ.items() if k not in LAUNCH_KEYS}
    full_env.update(env or {})
    full_env.setdefault("OMP_NUM_THREADS", "1")
    return full_env


@pytest.fixture(autouse=True)
def _launch_env_is_restored():
    """A test that runs a recipe in this process sets the launch variables; the next test starts without them."""
    saved = {k: os.environ.get(k) for k in LAUNCH_KEYS}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_tune(*args, cwd=None, env=None, timeout=900, check=True):
    """Run the real `tune` CLI of this interpreter's environment; return the completed process."""
    full_env = tune_env(env)
    proc = subprocess.run(
        [sys.executable, "-m", "torchtune._cli.tune", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        command = " ".join(map(str, args))
        raise AssertionError(f"tune {command} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def tune():
    return run_tune


def load_bench(name):
    """Import ``bench/<name>.py`` (the benchmarks are scripts, not a package) as a fresh module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_tp2_mesh():
    """A 2-rank CPU mesh in this one process (torch's fake backend: collectives return without data moving).

    For checks that fail before any collective result matters; real TP numerics are tested across processes
    (tests/training/_parallel_harness.py).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield init_device_mesh("cpu", (2,))
    dist.destroy_process_group()
