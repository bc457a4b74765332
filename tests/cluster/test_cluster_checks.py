"""The node-local output_dir rule and the printed batch script, without a cluster."""

import subprocess
import time
import uuid

import pytest
from omegaconf import OmegaConf
from torchtune_mistral3.slurm import render_sbatch
from torchtune_mistral3.slurm._script import main
from torchtune_mistral3.training._cluster import check_shared_output_dir, filesystem_of, node_local_reason

MOUNTS = """\
/dev/vda1 / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw 0 0
fs01:/export/home /home nfs4 rw,vers=4.2 0 0
10.0.0.1@o2ib:/lustre /lustre lustre rw 0 0
tmpfs /lustre/scratch/local tmpfs rw 0 0
/dev/nvme0n1 /scratch\\040local xfs rw 0 0
beegfs_nodev /mnt/beegfs beegfs rw 0 0
overlay /lustre/over overlay rw 0 0
fs01:/export/over /lustre/over nfs rw 0 0
"""

TWO_NODES = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}


@pytest.fixture
def mounts(tmp_path):
    path = tmp_path / "mounts"
    path.write_text(MOUNTS)
    return str(path)


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/tmp/run", ("/tmp", "tmpfs")),
        ("/home/me/runs/a/b", ("/home", "nfs4")),
        ("/lustre/proj/run", ("/lustre", "lustre")),
        ("/lustre/scratch/local/x", ("/lustre/scratch/local", "tmpfs")),  # the longest mount point wins
        ("/scratch local/run", ("/scratch local", "xfs")),  # octal escapes in /proc/mounts
        ("/lustre/over/run", ("/lustre/over", "nfs")),  # mounted over: the last entry wins
        ("/var/lib/x", ("/", "ext4")),
    ],
)
def test_filesystem_of_finds_the_mount_that_holds_a_path(mounts, path, expected):
    assert filesystem_of(path, mounts) == expected


@pytest.mark.parametrize(
    "path, local",
    [("/tmp/run", True), ("/scratch local/r", True), ("/var/lib/x", True), ("/home/me/r", False),
     ("/lustre/p", False), ("/mnt/beegfs/p", False), ("/lustre/scratch/local/p", True)],
)  # fmt: skip
def test_node_local_reason_follows_the_filesystem_type(mounts, path, local):
    assert (node_local_reason(path, mounts) is not None) == local


def test_without_a_mount_table_the_tmp_prefixes_are_node_local(tmp_path):
    missing = str(tmp_path / "no_mounts")
    assert node_local_reason("/dev/shm/run", missing) == "it is under /dev/shm"
    assert node_local_reason("/tmp", missing) == "it is under /tmp"
    assert node_local_reason("/tmpfoo/run", missing) is None
    assert node_local_reason("/shared/run", missing) is None


def test_the_check_reads_this_machines_mounts():
    # /dev/shm is tmpfs on Linux: the real /proc/mounts path of the rule, not a fake table
    assert node_local_reason("/dev/shm/some/run").startswith("it is on tmpfs")


def _cfg(output_dir, **extra):
    return OmegaConf.create({"output_dir": output_dir, "checkpointer": {"output_dir": output_dir}, **extra})


def test_multi_node_run_on_node_local_output_dir_is_refused_naming_the_key(mounts):
    with pytest.raises(
        ValueError,
        match=r"^output_dir=/tmp/run is node-local \(it is on tmpfs mounted at /tmp\), but this run spans 2 nodes",
    ) as e:
        check_shared_output_dir(_cfg("/tmp/run"), TWO_NODES, mounts)
    assert "assume_shared_output_dir=True" in str(e.value)
    check_shared_output_dir(_cfg("/lustre/run"), TWO_NODES, mounts)
    # the checkpointer's own output_dir is checked too
    cfg = _cfg("/lustre/run", checkpointer={"output_dir": "/tmp/ckpt"})
    with pytest.raises(ValueError, match=r"^checkpointer.output_dir=/tmp/ckpt is node-local"):
        check_shared_output_dir(cfg, TWO_NODES, mounts)


@pytest.mark.parametrize(
    "env, extra",
    [({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}, {}), ({}, {}), (TWO_NODES, {"assume_shared_output_dir": True})],
    ids=["one_node", "no_torchrun", "overridden"],
)
def test_one_node_or_the_override_accepts_node_local_output_dir(mounts, env, extra):
    check_shared_output_dir(_cfg("/tmp/run", **extra), env, mounts)


def test_tune_run_refuses_node_local_output_dir_before_any_work(tune):
    # a rank of a 2-node launch (what torchrun sets), started directly: the check runs first in __init__
    out = f"/dev/shm/{uuid.uuid4().hex}/run"
    start = time.monotonic()
    proc = tune(
        "run",
        "full_finetune_distributed",
        "--config",
        "mistral3p5_medpix_demo",
        f"output_dir={out}",
        env={"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"},
        check=False,
    )
    assert proc.returncode != 0
    assert f"output_dir={out} is node-local (it is on tmpfs mounted at /dev/shm)" in proc.stderr
    assert "Instantiating" not in proc.stdout + proc.stderr and "Step 1 |" not in proc.stdout
    assert time.monotonic() - start < 120


def _print(capsys, *args):
    """``python -m torchtune_mistral3.slurm ARGS``, in this process: (exit code, stdout, stderr)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_printed_script_runs_one_agent_per_node_for_the_128b_layout(capsys, tmp_path):
    code, script, err = _print(capsys, "--config", "mistral3p5_medpix", "--nodes", "8", "--partition", "gpu")
    assert code == 0, err
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --requeue", "TUNE_NPROC_PER_NODE=${TUNE_NPROC_PER_NODE:-8}",
                 '--rdzv_backend c10d --rdzv_endpoint "$RDZV_ADDR:$RDZV_PORT"', "HF_HUB_OFFLINE",
                 "TUNE_CONFIG=${TUNE_CONFIG:-mistral3p5_medpix}"):  # fmt: skip
        assert line in script, line
    assert "@" not in script.replace("USR1@300", "").replace("[@]", "").replace('"$@"', "")  # all filled in
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_printing_a_layout_that_does_not_fit_names_the_flags(capsys):
    code, out, err = _print(capsys, "--config", "mistral3p5_medpix", "--nodes", "4")
    assert code == 2 and out == ""
    assert "--nodes 4 x --nproc-per-node 8" in err and "= 64 processes, but 32" in err
    # overrides change the layout checked and are written into the script
    code, out, err = _print(capsys, "--config", "mistral3p5_medpix", "--nodes", "4", "pipeline_parallel_dim=4")
    assert code == 0, err
    assert "CONFIG_OVERRIDES=(pipeline_parallel_dim=4)" in out


def test_render_rejects_zero_nodes():
    with pytest.raises(ValueError, match="--nodes must be at least 1"):
        render_sbatch(config="x", nodes=0, nproc_per_node=1, gpus_per_node=0, cpus_per_node=1)
