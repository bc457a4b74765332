"""The rehearsal's fake runtime: which tensors stay real, what memory and collectives it counts (hand-derived)."""

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torchtune_mistral3.rehearse._fake import SMALL_NUMEL, fake_runtime, init_fake_process_group


@pytest.fixture
def world8():
    init_fake_process_group(rank=3, world_size=8)
    yield
    dist.destroy_process_group()


def test_large_tensors_are_fake_small_ones_real_and_values_read_as_one():
    with fake_runtime() as mode:
        big = torch.empty(SMALL_NUMEL + 1)
        small = torch.arange(10)
        assert isinstance(big, FakeTensor) and not isinstance(small, FakeTensor)
        assert (small * 2).tolist() == list(range(0, 20, 2))  # data-dependent Python on real tensors runs
        assert float(big.sum()) == 1.0 and bool(torch.isfinite(big).all())
        assert mode.values_read == 2


def test_peak_memory_counts_live_storages():
    n = 1 << 23  # fake: 32 MiB in fp32
    with fake_runtime() as mode:
        with mode.phase("p") as phase:
            a = torch.empty(n)
            b = a * 2  # a new storage
            del b
            c = a + 1  # a and c: b's storage was freed
            view = c[: n // 2]  # no new storage
            del c
            d = a - 1  # the view keeps c's storage alive: a, c and d
            del view, d
        assert phase.peak_bytes == 3 * 4 * n
        assert mode.live_bytes == 4 * n
        del a
        assert mode.live_bytes == 0


def test_collectives_counted_with_their_bytes(world8):
    mesh = init_device_mesh("cpu", (2, 4), mesh_dim_names=("dp", "tp"))
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(64, 128, bias=False), torch.nn.Linear(128, 32, bias=False))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "1": RowwiseParallel()})
    x = torch.ones(5, 64)
    with fake_runtime() as mode:
        model.to_empty(device="cpu")
        with mode.phase("forward") as phase:
            y = model(x)
    assert isinstance(y, FakeTensor) and y.shape == (5, 32)
    # RowwiseParallel's output: one all-reduce of the [5, 32] fp32 partial sums over the 4 TP ranks
    assert {k: (c.calls, c.bytes) for k, c in phase.collectives.items()} == {"all_reduce": (1, 5 * 32 * 4)}


def test_storage_resizes_are_counted():
    # FSDP2 frees an unsharded parameter with storage.resize_(0) and re-allocates it with resize_(n)
    n = 1 << 23
    with fake_runtime() as mode:
        with mode.phase("p") as phase:
            a = torch.empty(n)
            a.untyped_storage().resize_(0)
            assert mode.live_bytes == 0
            b = torch.empty(n)
            a.untyped_storage().resize_(4 * n)
            assert mode.live_bytes == 8 * n
            del a, b
        assert phase.peak_bytes == 8 * n and mode.live_bytes == 0
