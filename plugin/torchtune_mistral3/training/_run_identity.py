"""A run owns its ``output_dir``: an identity file, a lock held for the whole run, and what resume must not change.

At start, rank 0 takes an exclusive ``flock`` on ``<output_dir>/.run.lock`` (held until the process ends: a
crashed or killed run releases it with its file descriptors) and writes ``<output_dir>/run.json``: the run's
id, host, pid and start time, its resolved config, parallel layout, data files and batch. A second run into
the same directory while the first holds the lock is refused, naming the holder. A fresh run
(``resume_from_checkpoint=False``) into a directory holding another run's checkpoints (``epoch_<N>``) or
training states is refused unless ``overwrite_output_dir=True``; then the other run's files stay until this
run's first save has completed, and are deleted then.

Every training state carries a record of the run that wrote it (``run.json`` next to the rank files: the same
identity plus the steps per epoch, dataset rows and batches of that run). Resume compares it with the resuming
run and refuses every difference that changes the sample order, the schedule or the update, naming the key with
its saved and new values; :data:`SAFE_ON_RESUME` lists the keys that may change.

The lock is an advisory ``flock`` on one file. On a local disk it is exact. On NFS, Linux emulates ``flock``
with POSIX byte-range locks, which NFSv4 (and NFSv3 with ``lockd``) hold across clients, so the rank 0 of any
node sees another node's run; a mount with ``nolock`` (or ``local_lock=all``) keeps locks local to one client,
and a client that dies holds its lock until the server's lease expires (about 90 s on NFSv4). Lustre honours it
only when mounted with ``-o flock``. Where the file system refuses locks the run warns and goes on unlocked.
"""

import builtins
import errno
import fcntl
import getpass
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from ._metric_logging import check_log_dir_writable
from ._training_state import RUN_FILE, STATE_DIR

log = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"

# Config keys (and their sub-keys) that may differ on resume: they change neither which samples are seen in
# which order, nor the learning-rate schedule, nor the update. ``max_steps_per_epoch`` is judged by its effect
# (the steps per epoch): see check_resumable.
SAFE_ON_RESUME: Tuple[str, ...] = (
    "output_dir",
    "checkpointer.output_dir",
    "checkpointer.save_dtype",
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "allow_new_keys",
    "max_steps_per_epoch",
    "metric_logger",
    "log_every_n_steps",
    "log_peak_memory_stats",
    "log_level",
    "profiler",
    "run_val_every_n_steps",
    "max_val_steps",
    "dataset_val",
    "batch_size_val",
    "save_every_n_steps",
    "save_merged_model",
    "max_nonfinite_steps",
    "distributed_timeout_s",
    "compile",
    "enable_activation_checkpointing",
    "enable_activation_offloading",
    "ac_mode",
    "ac_option",
    "fsdp_cpu_offload",
    "fsdp_reshard_after_forward",
    "custom_sharded_layers",
    "prepare_checkpoint",
    "hf_repo",
    "assume_shared_output_dir",
)

_READ_BYTES = 1 << 20  # of a data file's head and tail, hashed into the data fingerprint


class OutputDirInUseError(RuntimeError):
    """Another process holds the lock of ``output_dir``: a run is writing there now."""


class OutputDirTakenError(FileExistsError):
    """A fresh run was started in an ``output_dir`` that holds another run's checkpoints or training states."""


def _flat(value: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(value, dict):
        out: Dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def _relative(value: Any, output_dir: str) -> Any:
    """``value`` with ``output_dir`` written as ``${output_dir}``: a run directory that was moved still matches."""
    if isinstance(value, str) and (value == output_dir or value.startswith(output_dir.rstrip("/") + "/")):
        return "${output_dir}" + value[len(output_dir.rstrip("/")) :]
    if isinstance(value, list):
        return [_relative(v, output_dir) for v in value]
    if isinstance(value, dict):
        return {k: _relative(v, output_dir) for k, v in value.items()}
    return value


def config_fingerprint(cfg: DictConfig) -> Dict[str, Any]:
    """The resolved config as ``{dotted key: value}``, paths under ``output_dir`` relative to it.

    Args:
        cfg (DictConfig): the run's config.

    Returns:
        Dict[str, Any]: JSON-compatible leaves (lists are kept whole).
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved = json.loads(json.dumps(resolved, default=str))  # the values a JSON file gives back
    return _flat(_relative(resolved, str(cfg.output_dir)))


def _file_fingerprint(path: Path) -> Dict[str, Any]:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_READ_BYTES))
        if size > 2 * _READ_BYTES:
            f.seek(size - _READ_BYTES)
        digest.update(f.read())
    return {"bytes": size, "sha256_head_tail": digest.hexdigest()}


def data_fingerprint(cfg: DictConfig) -> Dict[str, Dict[str, Any]]:
    """Size and a hash of the first and last MiB of every local file the ``dataset`` config names.

    Cheap on any data size; a file rewritten in its middle with the same size is not detected (the row count
    recorded at each save still is compared on resume).

    Args:
        cfg (DictConfig): the run's config.

    Returns:
        Dict[str, Dict[str, Any]]: ``{path: {"bytes": ..., "sha256_head_tail": ...}}``.
    """
    node = cfg.get("dataset", None)
    if node is None:
        return {}
    paths = {v for v in _strings(OmegaConf.to_container(node, resolve=True)) if os.path.isfile(v)}
    return {p: _file_fingerprint(Path(p)) for p in sorted(paths)}


def _strings(value: Any) -> List[str]:
    """Every string in nested dicts and lists (a list of datasets, ``data_files`` lists or dicts)."""
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [s for v in items for s in _strings(v)]


def run_identity(cfg: DictConfig, layout: Dict[str, int]) -> Dict[str, Any]:
    """What identifies a run: its config, layout, data files and batch.

    Args:
        cfg (DictConfig): the run's config.
        layout (Dict[str, int]): world size and parallel degrees (``dp`` among them).

    Returns:
        Dict[str, Any]: JSON-compatible.
    """
    batch = {
        "batch_size": int(cfg.batch_size),
        "gradient_accumulation_steps": int(cfg.get("gradient_accumulation_steps", 1) or 1),
        "data_parallel": int(layout.get("dp", 1)),
    }
    batch["global_batch"] = batch["batch_size"] * batch["gradient_accumulation_steps"] * batch["data_parallel"]
    return {"config": config_fingerprint(cfg), "layout": layout, "data_files": data_fingerprint(cfg), "batch": batch}


def previous_work(output_dir: Union[str, Path]) -> List[str]:
    """The checkpoints (``epoch_<N>``) and training states (``training_state/step_<N>``) in ``output_dir``."""
    root = Path(output_dir)
    epochs = [p for p in root.glob("epoch_*") if p.is_dir()]
    states = [p for p in (root / STATE_DIR).glob("step_*") if p.is_dir()]
    return sorted(str(p.relative_to(root)) for p in epochs + states)


def read_run_file(directory: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The ``run.json`` in ``directory``, or None if it is absent or unreadable."""
    try:
        return json.loads((Path(directory) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_run_file(directory: Union[str, Path], record: Dict[str, Any]) -> None:
    """Write ``directory/run.json`` atomically (a temporary file renamed into place)."""
    tmp = Path(directory) / f".{RUN_FILE}.partial"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, Path(directory) / RUN_FILE)


def _describe(record: Optional[Dict[str, Any]]) -> str:
    if not record:
        return "a run with no run.json (written before runs recorded themselves, or copied)"
    return (f"run {record.get('run_id')} (started {record.get('started')} on {record.get('host')}, pid "
            f"{record.get('pid')}, by {record.get('user')})")


class OutputDirLock:
    """An exclusive ``flock`` on ``<output_dir>/.run.lock``, held until :meth:`release` or the process ends.

    Args:
        output_dir (Union[str, Path]): the run's ``output_dir`` (created if missing).
    """

    def __init__(self, output_dir: Union[str, Path]) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: Optional[int] = None
        self._finalizer: Optional[weakref.finalize] = None

    def acquire(self, holder: Dict[str, Any]) -> bool:
        """Take the lock and write ``holder`` into the lock file.

        Args:
            holder (Dict[str, Any]): who holds it (host, pid, start time); shown to a run that is refused.

        Returns:
            bool: True if locked, False if the file system has no locks (the run goes on unlocked, with a warning).

        Raises:
            OutputDirInUseError: if another process holds the lock (the message names it).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                other = json.loads(self.path.read_text())
            except (OSError, ValueError):
                other = None
            who = _describe(other) if other else "a process that has not recorded itself yet"
            raise OutputDirInUseError(
                f"output_dir {self.path.parent} is in use by {who}, which holds {self.path}. Two runs in one "
                "output_dir would overwrite each other's checkpoints: wait for it to end, or give this run "
                "another output_dir. The lock is released when that process ends, even if it crashes or is killed."
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log.warning(
                f"The file system of {self.path.parent} cannot lock {self.path} ({e.strerror}): this run goes on "
                "without the lock, so nothing stops a second run from writing into the same output_dir at once. "
                "On NFS, mount with locking (not nolock); on Lustre, mount with -o flock."
            )
            return False
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)  # also released if the object is dropped
        return True

    def release(self) -> None:
        """Release the lock (the file stays: deleting it would let two runs lock two different files)."""
        if self._finalizer is not None:
            self._finalizer()  # closing the descriptor releases the flock
            self._finalizer, self._fd = None, None


class RunClaim:
    """This run's hold on its ``output_dir``: its id, its lock, and whether it replaces another run's files.

    Args:
        output_dir (Union[str, Path]): the run's ``output_dir``.
        run_id (str): this run's id (a resumed run takes the id of the run it continues).
        lock (Optional[OutputDirLock]): the lock, on rank 0 only.
        replacing (bool): ``overwrite_output_dir=True`` over another run's files, deleted at this run's first save.
    """

    def __init__(self, output_dir: Union[str, Path], run_id: str, lock: Optional[OutputDirLock], replacing: bool):
        self.output_dir = Path(output_dir)
        self.run_id = run_id
        self.lock = lock
        self.replacing = replacing

    def continue_run(self, state_dir: Union[str, Path]) -> None:
        """Take the id of the run that saved ``state_dir`` (this run resumes it); rank 0 updates ``run.json``.

        Args:
            state_dir (Union[str, Path]): the training state this run resumed from.
        """
        saved = read_run_file(state_dir)
        if saved is None or saved.get("run_id") in (None, self.run_id):
            return
        self.run_id = saved["run_id"]
        if self.lock is not None:
            record = read_run_file(self.output_dir) or {}
            write_run_file(self.output_dir, {**record, "run_id": self.run_id})

    def delete_replaced_checkpoints(self, keep: Union[str, Path]) -> None:
        """After this run's first complete save, delete the replaced run's ``epoch_<N>`` (rank 0; all ranks call).

        Its training states are deleted by :func:`save_training_state` (``replace_other_runs``).

        Args:
            keep (Union[str, Path]): the checkpoint this run has just written.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            for p in self.output_dir.glob("epoch_*"):
                if p.is_dir() and p.resolve() != Path(keep).resolve():
                    shutil.rmtree(p, ignore_errors=True)
            record = read_run_file(self.output_dir)
            if record is not None and "replaces" in record:
                record["replaced"] = record.pop("replaces")
                write_run_file(self.output_dir, record)
        self.replacing = False


def run_record(
    cfg: DictConfig,
    layout: Dict[str, int],
    *,
    run_id: Optional[str],
    dataloader: Any,
    steps_per_epoch: int,
    epochs_run: int,
) -> Dict[str, Any]:
    """What a training state records of the run that saved it; compared on resume by :func:`check_resumable`.

    Args:
        cfg (DictConfig): the run's config.
        layout (Dict[str, int]): world size and parallel degrees.
        run_id (Optional[str]): the run's id.
        dataloader (Any): the training data loader (its dataset's rows and its batches per epoch are recorded).
        steps_per_epoch (int): optimizer steps per epoch (after ``max_steps_per_epoch``).
        epochs_run (int): epochs completed at this state.

    Returns:
        Dict[str, Any]: JSON-compatible.
    """
    return {
        "run_id": run_id,
        **run_identity(cfg, layout),
        "rows": len(dataloader.dataset),
        "batches_per_epoch": len(dataloader),
        "steps_per_epoch": steps_per_epoch,
        "epochs_run": epochs_run,
    }


def claim_output_dir(cfg: DictConfig, layout: Dict[str, int]) -> RunClaim:
    """Lock ``cfg.output_dir`` for this run and record it in ``run.json``; call on every rank (rank 0 does it).

    Args:
        cfg (DictConfig): the run's config (``output_dir``, ``resume_from_checkpoint``, ``overwrite_output_dir``).
        layout (Dict[str, int]): world size and parallel degrees.

    Returns:
        RunClaim: the run's id and lock.

    Raises:
        OutputDirInUseError: on every rank, if another process holds the directory's lock.
        OutputDirTakenError: on every rank, if a fresh run finds another run's checkpoints or training states and
            ``overwrite_output_dir`` is not True.
    """
    distributed = dist.is_available() and dist.is_initialized()
    outcome: List[Any] = [None]
    lock = None
    if not distributed or dist.get_rank() == 0:
        try:
            lock, run_id, replacing = _claim(cfg, layout)
            outcome = [(run_id, replacing, None)]
        except (OutputDirInUseError, OutputDirTakenError, OSError) as e:  # every rank raises it, not only rank 0
            outcome = [(None, False, (type(e).__name__, str(e)))]
    if distributed:
        dist.broadcast_object_list(outcome, src=0)
    run_id, replacing, error = outcome[0]
    if error is not None:
        kinds = {k.__name__: k for k in (OutputDirInUseError, OutputDirTakenError)}
        kind = kinds.get(error[0]) or getattr(builtins, error[0], OSError)  # an OSError subclass keeps its name
        raise kind(error[1])
    return RunClaim(cfg.output_dir, run_id, lock, replacing)


def _claim(cfg: DictConfig, layout: Dict[str, int]) -> Tuple[OutputDirLock, str, bool]:
    output_dir = Path(cfg.output_dir)
    # an output_dir this user cannot create or write is named now, before the lock file is made in it
    check_log_dir_writable(cfg.get("metric_logger", {}).get("log_dir", None) or str(output_dir))
    resume = bool(cfg.get("resume_from_checkpoint", False))
    overwrite = bool(cfg.get("overwrite_output_dir", False))
    previous = read_run_file(output_dir)
    run_id = previous["run_id"] if resume and previous and "run_id" in previous else uuid.uuid4().hex[:12]
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    holder = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started": started, "user": _user()}
    lock = OutputDirLock(output_dir)
    lock.acquire(holder)
    previous = read_run_file(output_dir)  # again, under the lock
    work = [] if resume else previous_work(output_dir)
    if work and not overwrite:
        lock.release()
        shown = ", ".join(work[:4]) + (f" and {len(work) - 4} more" if len(work) > 4 else "")
        raise OutputDirTakenError(
            f"output_dir {output_dir} holds the work of {_describe(previous)}: {shown}. This run is a new one "
            "(resume_from_checkpoint=False) and would overwrite it. Continue that run with "
            f"resume_from_checkpoint=True; start beside it with output_dir={_free_subdir(output_dir)}; or replace "
            "it with overwrite_output_dir=True (its files are deleted once this run's first save is complete)."
        )
    record = {**holder, **run_identity(cfg, layout)}
    if work:
        record["replaces"] = {"run": previous.get("run_id") if previous else None, "files": work}
    write_run_file(output_dir, record)
    return lock, run_id, bool(work)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _free_subdir(output_dir: Path) -> Path:
    n = 2
    while (output_dir / f"run_{n}").exists():
        n += 1
    return output_dir / f"run_{n}"


def check_resumable(directory: Union[str, Path], now: Dict[str, Any]) -> None:
    """Refuse to resume the training state in ``directory`` if this run would not continue it exactly.

    Compares the state's ``run.json`` (written by :func:`save_training_state`) with ``now``: every config key
    outside :data:`SAFE_ON_RESUME`, the data files, the dataset rows and batches per epoch, and the steps per
    epoch. The steps per epoch (``max_steps_per_epoch`` and the data) may grow only where nothing depends on
    them: without ``lr_scheduler`` and within the first epoch.

    Args:
        directory (Union[str, Path]): a ``training_state/step_<N>`` directory.
        now (Dict[str, Any]): this run's record (:func:`run_identity` plus ``steps_per_epoch``, ``rows``,
            ``batches_per_epoch``).

    Raises:
        ValueError: naming every key that differs, with its saved and new values.
    """
    saved = read_run_file(directory)
    if saved is None:
        log.warning(f"{directory} has no {RUN_FILE} (saved by an older version): resuming without checking its config")
        return
    diffs = []
    old_cfg, new_cfg = saved.get("config", {}), now["config"]
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if any(key == s or key.startswith(s + ".") for s in SAFE_ON_RESUME):
            continue
        old, new = old_cfg.get(key, "<absent>"), new_cfg.get(key, "<absent>")
        if old != new:
            diffs.append(f"{key}: {old!r} -> {new!r}")
    if saved.get("data_files", {}) != now["data_files"]:
        diffs.append(f"data files: {saved.get('data_files')} -> {now['data_files']}")
    for key in ("rows", "batches_per_epoch"):
        if saved.get(key) is not None and saved.get(key) != now[key]:
            diffs.append(f"{key} of the training data: {saved.get(key)} -> {now[key]}")
    old_steps, new_steps = saved.get("steps_per_epoch"), now["steps_per_epoch"]
    if old_steps is not None and new_steps != old_steps:
        scheduled = any(v is not None for k, v in new_cfg.items() if k.split(".")[0] == "lr_scheduler")
        grows_safely = new_steps > old_steps and saved.get("epochs_run") == 0 and not scheduled
        if not grows_safely:
            diffs.append(
                f"steps per epoch (max_steps_per_epoch={old_cfg.get('max_steps_per_epoch')!r} -> "
                f"{new_cfg.get('max_steps_per_epoch')!r}): {old_steps} -> {new_steps} (fewer cut the epoch short; "
                "more change the learning-rate schedule's length or the epoch boundaries)"
            )
    if diffs:
        raise ValueError(
            f"Cannot resume {directory} exactly: this run differs from the run that saved it in "
            f"{'; '.join(diffs)} (saved -> now). Resume with the saved values (the keys that may change on resume "
            "are listed in docs/checkpointing.md), or start a new run in another output_dir from the HF checkpoint "
            "(checkpoint_dir=<output_dir>/epoch_<N>, with prepare_checkpoint=null on the demo configs), which "
            "restarts the optimizer and the data order."
        )
