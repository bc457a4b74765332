"""The shipped batch script under a real Slurm: munged, slurmctld and two slurmd (two "nodes" on this machine).

Slurm is configured by the test for this machine (a slurm.conf in a temporary directory, one CPU per node,
proctrack/linuxproc and no cgroups, which containers often lack) and torn down afterwards. The job runs the
demo config on 2 nodes x 1 process; it is requeued with `scontrol requeue` while it trains, and the resumed
attempt must log the losses of an uninterrupted run. Without the Debian packages (`apt-get install slurm-wlm
munge`) or without root the daemons cannot start and the test is skipped, unless TUNE_MISTRAL3_REQUIRE_SLURM=1
(set by .ci/run, which installs them) makes that a failure.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cluster_runs import OVERRIDES, STEPS, losses_per_log
from torchtune_mistral3.slurm import render_sbatch

pytestmark = pytest.mark.integration

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")


def _cannot_run(reason):
    if os.environ.get("TUNE_MISTRAL3_REQUIRE_SLURM") == "1":
        pytest.fail(f"a real Slurm is required here (TUNE_MISTRAL3_REQUIRE_SLURM=1) but {reason}")
    pytest.skip(reason)


def _free_port_pair():
    for base in range(31000 + os.getpid() % 1000 * 20, 65000, 7):
        try:
            with socket.socket() as a, socket.socket() as b, socket.socket() as c:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
                c.bind(("127.0.0.1", base + 2))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def _wait(predicate, timeout, what, poll=0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running two-node Slurm on this machine; yields the environment that points its clients at it."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        _cannot_run(f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        _cannot_run("slurmd must run as root to start jobs")
    d = tmp_path_factory.mktemp("slurm")
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    (d / "munge").mkdir()
    sock = d / "munge" / "munge.socket"
    host = socket.gethostname()
    port = _free_port_pair()
    conf = d / "slurm.conf"
    conf.write_text(f"""\
ClusterName=tunetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=30
NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port={port + 1}-{port + 2} CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf), "OMP_NUM_THREADS": "1"}
    pids = []

    def start(cmd, pid_file):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            _cannot_run(f"`{' '.join(map(str, cmd))}` failed ({proc.returncode}): {proc.stderr.strip()}")
        pid = _wait(lambda: pid_file.is_file() and pid_file.read_text().strip(), 30, pid_file)
        pids.append(int(pid))

    try:
        start(
            [
                "munged",
                "--force",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--pid-file={d}/munge/munged.pid",
                f"--log-file={d}/munge/munged.log",
                f"--seed-file={d}/munge/seed",
            ],
            d / "munge" / "munged.pid",
        )
        start(["slurmctld", "-f", conf], d / "slurmctld.pid")
        for node in ("n1", "n2"):
            start(["slurmd", "-f", conf, "-N", node], d / f"slurmd-{node}.pid")
        _wait(lambda: subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
              .stdout.split() == ["idle"], 60, "both nodes idle in sinfo")  # fmt: skip
        yield env, d
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True)
        for pid in reversed(pids):  # only the daemons this fixture started, by their ids
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _job(env, job_id):
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def test_sbatch_job_requeued_while_training_resumes_and_logs_the_uninterrupted_losses(
    slurm, uninterrupted_losses, tmp_path
):
    env, _ = slurm
    expected = uninterrupted_losses

    out = tmp_path / "run"
    script = tmp_path / "demo.sbatch"
    script.write_text(render_sbatch(
        config="mistral3p5_medpix_demo", nodes=2, nproc_per_node=1, gpus_per_node=0, cpus_per_node=1,
        time="00:30:00", output_dir=str(out), save_every_n_steps=2, python_env=sys.prefix,
        # both "nodes" are this machine, whose local disk they share
        overrides=[*OVERRIDES, "assume_shared_output_dir=True"],
    ))  # fmt: skip
    submit = subprocess.run(["sbatch", "--parsable", str(script)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    log = tmp_path / f"mistral3p5_medpix_demo-{job_id}.out"

    try:
        # requeue once the first resumable state is complete, while steps remain
        _wait(lambda: (out / "training_state" / "step_2").is_dir(), 600, "training_state/step_2")
        requeue = subprocess.run(["scontrol", "requeue", job_id], env=env, capture_output=True, text=True)
        assert requeue.returncode == 0, requeue.stderr
        _wait(lambda: _job(env, job_id).get("JobState") == "PENDING", 120, "the job back in the queue")
        # a requeued job is held back ~2 minutes (BeginTime); release it now
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True)
        state = _wait(lambda: _job(env, job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
                      and _job(env, job_id), 900, "the resumed attempt to end")  # fmt: skip
    finally:
        print(log.read_text() if log.is_file() else "(no job log)")
    text = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (state, text[-5000:])
    assert state["Restarts"] == "1"
    assert "attempt 0: no training state" in text
    resumed = re.search(r"attempt 1: resuming from (\S+)/step_(\d+)", text)
    assert resumed, text[-5000:]
    resumed_at = int(resumed[2])
    assert resumed_at in (2, 4), resumed_at  # the newest complete state when the first attempt was stopped

    first, second = losses_per_log(out)
    assert min(first) == 1 and max(first) >= resumed_at and max(first) < STEPS[-1], first  # it was interrupted
    assert sorted(second) == list(range(resumed_at + 1, STEPS[-1] + 1)), second
    for attempt in (first, second):
        for step, loss in attempt.items():
            assert loss == pytest.approx(expected[step], rel=1e-6, abs=0), (step, attempt)
    assert (out / "epoch_0" / "config.json").is_file() and list((out / "epoch_0").glob("*.safetensors"))
    assert (out / "training_state" / f"step_{STEPS[-1]}").is_dir()
