"""clip_grad_norm_ under PP (disjoint parameters per rank) and TP/FSDP (DTensors on different meshes)."""

import math
import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torchtune_mistral3.training import clip_grad_norm_


def _params(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g))
        p.grad = torch.randn(shape, generator=g)
        params.append(p)
    return params


SHAPES = [(4, 6), (6,), (8, 4), (3, 3, 2)]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_single_process_equals_torch(norm_type):
    mine, ref = _params(0, SHAPES), _params(0, SHAPES)
    mine.append(torch.nn.Parameter(torch.ones(2)))  # no grad: skipped, like torch
    total = clip_grad_norm_(mine, 0.5, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(ref, 0.5, norm_type)
    torch.testing.assert_close(total, expected)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a.grad, b.grad)


def _worker(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    full = _params(0, SHAPES)
    for norm_type in (2.0, math.inf):
        ref = [torch.nn.Parameter(p.detach().clone()) for p in full]
        for r, p in zip(ref, full):
            r.grad = p.grad.clone()
        expected = torch.nn.utils.clip_grad_norm_(ref, 0.5, norm_type)

        # PP: each rank holds a disjoint half; the pp all_reduce makes the norm global.
        local = [torch.nn.Parameter(p.detach().clone()) for p in full[rank::2]]
        for q, p in zip(local, full[rank::2]):
            q.grad = p.grad.clone()
        total = clip_grad_norm_(local, 0.5, norm_type, pp_group=dist.group.WORLD)
        torch.testing.assert_close(total, expected)
        for q, r in zip(local, ref[rank::2]):
            torch.testing.assert_close(q.grad, r.grad)

        # TP: a Shard(0) DTensor, a Shard(1) DTensor, a Replicate DTensor and a plain tensor together.
        mesh = init_device_mesh("cpu", (2,))
        placements = [Shard(0), None, Shard(1), Replicate()]
        mixed = []
        for p, placement in zip(full, placements):
            if placement is None:
                q = torch.nn.Parameter(p.detach().clone())
                q.grad = p.grad.clone()
            else:
                q = torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [placement]))
                q.grad = distribute_tensor(p.grad, mesh, [placement])
            mixed.append(q)
        total = clip_grad_norm_(mixed, 0.5, norm_type)
        torch.testing.assert_close(total, expected)
        for q, r in zip(mixed, ref):
            g = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
            torch.testing.assert_close(g, r.grad)
    dist.barrier()
    os._exit(0)


def test_pp_and_tp_equal_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "store"),), nprocs=2, join=True)
