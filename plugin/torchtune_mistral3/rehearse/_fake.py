"""The fake runtime of a rehearsal: fake tensors with real shapes, the fake process group, and what they cost.

One process plays one rank of a large job at a time:

- collectives run on torch's fake process group (``backend="fake"``, any world size and rank; every
  collective returns at once without data);
- weights, gradients, optimizer states and activations are ``FakeTensor`` s: shapes, dtypes and devices,
  no storage, so a 128B model's shard costs nothing;
- small tensors built from the batch (token ids, label masks, image sizes, sample indices) stay real, so the
  recipe's data-dependent Python (``tolist()`` of image sizes, label counts) runs exactly as on a GPU;
- a value read back from a fake tensor (a loss, a gradient norm, a finiteness check) has no value: it reads
  as 1 (``True`` for a flag), so the step takes the path of a finite step. The number of such reads is reported.

:class:`RehearsalMode` counts every collective (kind, bytes) and the bytes of every live tensor storage
(fake or real, on the training device), whose maximum is the rank's peak memory.
"""

import contextlib
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.fake_collectives import CollectiveOp, collective_ops
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

_aten = torch.ops.aten
_NOT_COMMUNICATION = {torch.ops._c10d_functional.wait_tensor.default}

# A factory result at most this large stays a real tensor (index vectors, counters, RoPE tables, masks built
# from token ids); anything larger (activation buffers, weights) is fake.
SMALL_NUMEL = 1 << 22
# The live tensors near a phase's peak are summarised each time the live bytes grow past the last summary by
# 1/64 of them (at least 1 MiB): the summary lies within about 1.6% below the peak.
_SNAPSHOT_MIN_STEP = 1024**2


def _plain(t: torch.Tensor) -> bool:
    """A real tensor (or meta tensor): no fake storage, no DTensor wrapper."""
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


@dataclass
class CollectiveCount:
    """Collectives of one kind: how many, and the bytes of the tensors they move (per rank, as issued)."""

    calls: int = 0
    bytes: int = 0


@dataclass
class Phase:
    """Memory and collectives of one phase (setup, step, save); ``at_peak``: live bytes by making op near the peak."""

    peak_bytes: int = 0
    seconds: float = 0.0
    collectives: Dict[str, CollectiveCount] = field(default_factory=dict)
    at_peak: Dict[str, int] = field(default_factory=dict)


class RehearsalMode(TorchDispatchMode):
    """Routes each op to fake or real execution and accounts for live memory and collectives.

    Enter it inside a ``FakeTensorMode(allow_non_fake_inputs=True)`` (see :func:`fake_runtime`).

    Args:
        device_type (str): the training device type; storages elsewhere (``meta``) are not counted.
    """

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self.live_bytes = 0
        self.values_read = 0
        self.phases: Dict[str, Phase] = {}
        self._phase: Optional[Phase] = None
        self._seen: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
        self._sizes: Dict[int, int] = {}  # id(storage) -> its bytes now
        self._labels: Dict[int, str] = {}  # id(storage) -> the op that made it, and its dtype
        self._snapshot_at = 0
        self._paused = 0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        """Account peak memory (starting from what is live now) and collectives to ``name``."""
        phase = self.phases.setdefault(name, Phase())
        phase.peak_bytes = max(phase.peak_bytes, self.live_bytes)
        self._snapshot_at = 0
        previous, self._phase = self._phase, phase
        start = time.perf_counter()
        try:
            yield phase
        finally:
            phase.seconds += time.perf_counter() - start
            self._phase = previous

    @contextlib.contextmanager
    def untracked(self) -> Iterator[None]:
        """Leave the storages made in the block out of the count (host-side data, not device memory)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _track(self, out: Any, label: str = "?") -> None:
        if self._paused:
            return
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            t = _local(t)
            if t.device.type != self.device_type:
                continue
            storage = t.untyped_storage()
            if storage in self._seen:
                continue
            n = storage.nbytes()
            self._seen[storage] = True
            self._sizes[id(storage)] = n
            self._labels[id(storage)] = f"{label} {str(t.dtype).replace('torch.', '')}"
            self.live_bytes += n
            weakref.finalize(storage, self._free, id(storage))
        self._update_peak()

    def _update_peak(self) -> None:
        phase = self._phase
        if phase is not None and self.live_bytes > phase.peak_bytes:
            phase.peak_bytes = self.live_bytes
            if self.live_bytes >= self._snapshot_at:  # what is live near the peak
                self._snapshot_at = self.live_bytes + max(_SNAPSHOT_MIN_STEP, self.live_bytes // 64)
                live: Dict[str, int] = {}
                for key, n in self._sizes.items():
                    live[self._labels[key]] = live.get(self._labels[key], 0) + n
                phase.at_peak = dict(sorted(live.items(), key=lambda kv: -kv[1])[:10])

    def _free(self, key: int) -> None:
        self.live_bytes -= self._sizes.pop(key, 0)
        self._labels.pop(key, None)

    def resized(self, storage: Any) -> None:
        """Account a storage's new size (FSDP2 frees and re-allocates unsharded parameters with ``resize_``)."""
        if storage not in self._seen:
            return
        n = storage.nbytes()
        self.live_bytes += n - self._sizes[id(storage)]
        self._sizes[id(storage)] = n
        if n:
            self._labels[id(storage)] = "resize_ (FSDP2 unsharded parameter)"
        self._update_peak()

    def _count_collective(self, func, args, kwargs, out) -> None:
        if self._phase is None:
            return
        try:
            n = CollectiveOp.get_comm_tensor_size(func, out, args, kwargs)
        except Exception:  # an op torch's table does not size: count the call
            n = 0
        c = self._phase.collectives.setdefault(func.__name__.split(".")[0], CollectiveCount())
        c.calls += 1
        c.bytes += int(n)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            # a value read from a tensor that has none: 1 (True), the value of a finite, non-empty step
            self.values_read += 1
            return True if args[0].dtype == torch.bool else 1 if not args[0].is_floating_point() else 1.0
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if tensors and all(_plain(t) for t in tensors):
            with _disable_current_modes():
                out = func(*args, **kwargs)
        elif not tensors:
            out = func(*args, **kwargs)  # the fake result tells the size
            small = all(t.numel() <= SMALL_NUMEL for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            if small:
                with _disable_current_modes():
                    out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if func in collective_ops and func not in _NOT_COMMUNICATION:
            self._count_collective(func, args, kwargs, out)
        self._track(out, func.__name__)
        return out


@contextlib.contextmanager
def fake_runtime(device_type: str = "cpu") -> Iterator[RehearsalMode]:
    """Enter fake tensors (real shapes, no storage) with a :class:`RehearsalMode` on top.

    Args:
        device_type (str): training device type. Default is "cpu".

    Yields:
        RehearsalMode: the accounting mode.
    """
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    mode = RehearsalMode(device_type)
    resize = torch.UntypedStorage.resize_

    def resize_(storage, size):
        out = resize(storage, size)
        mode.resized(storage)
        return out

    with fake, mode, patched(torch.UntypedStorage, "resize_", resize_):
        yield mode


def init_fake_process_group(rank: int, world_size: int) -> None:
    """(Re)initialise the default process group as torch's fake backend, playing ``rank`` of ``world_size``.

    Args:
        rank (int): the rank to play.
        world_size (int): the job's world size.
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``obj.name = value`` for the duration of the block."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class StageMetaMailbox:
    """Pipeline stages' shape metadata, passed between the ranks a rehearsal plays one after another.

    torch's ``PipelineStage`` infers each stage's input and output shapes at the first step, sending the
    metadata from rank to rank with ``send_object_list``; on the fake backend nothing arrives. Playing the
    pipeline ranks in order (pp rank 0 first), this mailbox hands a stage what its neighbour sent: the
    forward metadata of the last stage output sent (every decoder stage boundary carries the same hidden
    state, which :meth:`recv` checks against the stage's own input when it has run once), and for the
    backward the gradient metadata of the stage's own outputs (a gradient has its tensor's shape and dtype).
    """

    def __init__(self) -> None:
        self.forward: Optional[Any] = None
        self.sent: List[Tuple[int, Any]] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Route ``PipelineStage`` metadata sends and receives through the mailbox."""
        from torch.distributed.pipelining import stage as stage_mod

        mailbox = self

        def send_meta(stage, meta: Any, dst_stage: int) -> None:
            if isinstance(meta, stage_mod._StageForwardMeta):
                mailbox.forward = meta
                mailbox.sent.append((stage.stage_index, meta))

        def recv_meta(stage, src_stage: int) -> Any:
            if src_stage < stage.stage_index:  # forward: the previous stage's output
                if mailbox.forward is None:
                    raise RuntimeError(
                        f"rehearsal: stage {stage.stage_index} needs the output metadata of stage {src_stage}, "
                        "which no rank played so far sent; play the pipeline ranks in order from pp rank 0"
                    )
                return mailbox.forward
            grads = stage_mod._derive_grad_metas(stage._stage_meta.outputs)
            return stage_mod._StageBackwardMeta(backward_metas=tuple(grads))

        with patched(stage_mod.PipelineStage, "_send_meta", send_meta), patched(
            stage_mod.PipelineStage, "_recv_meta", recv_meta
        ):
            yield
