"""Checks for runs that span several nodes, made before any process group or GPU work.

A multi-node run writes per-rank training states and checkpoint shards from every node into ``output_dir``,
and a resumed run reads all of them back: ``output_dir`` must be one directory that every node sees. Whether
a path is shared is decided from the type of the filesystem it lives on (``/proc/mounts``):

- node-local: in-memory (``tmpfs``, ``ramfs``), container layers (``overlay``, ``aufs``) and local-disk
  filesystems (``ext4``, ``xfs``, ``btrfs``, ...) -- a multi-node run refuses them;
- anything else (``nfs``, ``lustre``, ``gpfs``, ``beegfs``, ``cephfs``, ``wekafs``, FUSE mounts, ...) is
  taken as shared;
- without ``/proc/mounts`` (not Linux) the path rule is used: ``/tmp``, ``/var/tmp`` and ``/dev/shm`` are
  node-local.

A run is multi-node when torchrun's ``WORLD_SIZE`` exceeds its ``LOCAL_WORLD_SIZE`` (processes on this node).
``assume_shared_output_dir: True`` skips the check, e.g. for a local disk exported to the other nodes by
a mount this rule cannot see, or for several torchrun agents on one machine.
"""

import os
from pathlib import Path
from typing import Dict, Optional, Tuple

from omegaconf import DictConfig

NODE_LOCAL_FILESYSTEMS = frozenset(
    {"tmpfs", "ramfs", "devtmpfs", "overlay", "aufs", "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs",
     "vfat", "exfat", "squashfs"}
)  # fmt: skip
NODE_LOCAL_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm")
PROC_MOUNTS = "/proc/mounts"


def _unescape(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash in paths as octal escapes
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def filesystem_of(path: str, mounts_file: str = PROC_MOUNTS) -> Optional[Tuple[str, str]]:
    """The mount point and filesystem type that hold ``path`` (which need not exist yet).

    Args:
        path (str): a file or directory path.
        mounts_file (str): the mount table to read. Default is ``/proc/mounts``.

    Returns:
        Optional[Tuple[str, str]]: ``(mount point, filesystem type)`` of the longest mount point containing the
        path (the last one listed when a point is mounted over), or None if the mount table cannot be read.
    """
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        return None
    mounts: Dict[str, str] = {}
    for line in lines:
        fields = line.split()
        if len(fields) >= 3:
            mounts[_unescape(fields[1])] = fields[2]
    target = Path(os.path.realpath(os.path.abspath(path)))
    for candidate in (target, *target.parents):
        if str(candidate) in mounts:
            return str(candidate), mounts[str(candidate)]
    return None


def node_local_reason(path: str, mounts_file: str = PROC_MOUNTS) -> Optional[str]:
    """Why ``path`` is only visible on this node, or None when it is (taken as) shared storage.

    Args:
        path (str): a directory path; it need not exist yet.
        mounts_file (str): the mount table to read. Default is ``/proc/mounts``.

    Returns:
        Optional[str]: e.g. ``"it is on tmpfs mounted at /tmp"``, or None.
    """
    found = filesystem_of(path, mounts_file)
    if found is not None:
        mount_point, fstype = found
        return f"it is on {fstype} mounted at {mount_point}" if fstype in NODE_LOCAL_FILESYSTEMS else None
    real = os.path.realpath(os.path.abspath(path))
    for prefix in NODE_LOCAL_PREFIXES:
        if real == prefix or real.startswith(prefix + "/"):
            return f"it is under {prefix}"
    return None


def nodes_in_run(environ: Optional[Dict[str, str]] = None) -> int:
    """How many nodes the torchrun launch spans (1 without torchrun).

    Args:
        environ (Optional[Dict[str, str]]): the environment; ``os.environ`` if None.

    Returns:
        int: ``WORLD_SIZE // LOCAL_WORLD_SIZE``, at least 1.
    """
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    local = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    return max(1, -(-world // max(local, 1)))


def check_shared_output_dir(
    cfg: DictConfig, environ: Optional[Dict[str, str]] = None, mounts_file: str = PROC_MOUNTS
) -> None:
    """Stop a multi-node run at once when ``output_dir`` (or ``checkpointer.output_dir``) is node-local.

    Args:
        cfg (DictConfig): the parsed config; reads ``output_dir``, ``checkpointer.output_dir`` and
            ``assume_shared_output_dir`` (default False).
        environ (Optional[Dict[str, str]]): the environment; ``os.environ`` if None.
        mounts_file (str): the mount table to read. Default is ``/proc/mounts``.

    Raises:
        ValueError: naming the key, the path, why it is node-local and what to set instead.
    """
    nodes = nodes_in_run(environ)
    if nodes == 1 or cfg.get("assume_shared_output_dir", False):
        return
    keys = {"output_dir": cfg.get("output_dir", None)}
    if cfg.get("checkpointer", None) is not None:
        keys["checkpointer.output_dir"] = cfg.checkpointer.get("output_dir", None)
    for key, path in keys.items():
        reason = None if path is None else node_local_reason(str(path), mounts_file)
        if reason is not None:
            raise ValueError(
                f"{key}={path} is node-local ({reason}), but this run spans {nodes} nodes: every node writes its "
                "ranks' checkpoint shards and training states there, and a resume needs all of them in one "
                f"place. Set {key}=<a directory on storage every node mounts (NFS, Lustre, GPFS, BeeGFS, ...)>, "
                "or, if this path is shared after all, assume_shared_output_dir=True (see docs/cluster.md)."
            )
