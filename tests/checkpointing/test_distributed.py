"""Slice-wise loading and per-stage saving under real DTensor TP, FSDP2, 2-D and pipeline layouts (CPU, gloo)."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _tiny_checkpoints import TinyTextModel, tiny_hf_model, write_checkpoint
from safetensors import safe_open
from torch import nn
from torchtune_mistral3.checkpointing import HFCheckpointReader, load_into_module, save_distributed, write_hf_checkpoint

TP_PLAN = {
    "decoder.layers.*.attn.q_proj": "colwise",
    "decoder.layers.*.attn.k_proj": "colwise",
    "decoder.layers.*.attn.v_proj": "colwise",
    "decoder.layers.*.attn.output_proj": "rowwise",
    "decoder.layers.*.mlp.w1": "colwise",
    "decoder.layers.*.mlp.w3": "colwise",
    "decoder.layers.*.mlp.w2": "rowwise",
}
# mode -> (world size, mesh shape, mesh dim names)
LAYOUTS = {
    "tp": (2, (2,), ("tp",)),
    "fsdp": (2, (2,), ("dp",)),
    "fsdp_tp": (4, (2, 2), ("dp", "tp")),
    "pp": (2, (2,), ("pp",)),
    "pp_tp": (4, (2, 2), ("pp", "tp")),
}
SHARD_BYTES = 30_000  # several files per save
TOKENS = torch.tensor([[1, 5, 9, 33, 200, 17, 4, 2]])


def _stage(model: TinyTextModel, stage: int) -> nn.Module:
    """Keep stage 0 = embeddings + layer 0, stage 1 = layer 1 + norm + output, with the full model's key names."""
    stage_module, decoder = nn.Module(), nn.Module()
    stage_module.decoder = decoder
    if stage == 0:
        decoder.tok_embeddings = model.decoder.tok_embeddings
        decoder.layers = nn.ModuleDict({"0": model.decoder.layers[0]})
    else:
        decoder.layers = nn.ModuleDict({"1": model.decoder.layers[1]})
        decoder.norm, decoder.output = model.decoder.norm, model.decoder.output
    return stage_module


def _parallelize(model: nn.Module, mode: str, mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torchtune.training import prepare_mha_for_tp

    names = mesh.mesh_dim_names
    if "pp" in names:
        model = _stage(model, mesh.get_local_rank("pp"))
    if "tp" in names:
        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        plan = {k: styles[v]() for k, v in TP_PLAN.items()}
        if "pp" in names:
            plan = {k.replace("*", str(mesh.get_local_rank("pp"))): v for k, v in plan.items()}
        else:
            prepare_mha_for_tp(model.decoder, mesh["tp"])
        parallelize_module(model, mesh["tp"], plan)
    if "dp" in names:
        for layer in model.decoder.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    return model


def _worker(rank, world, modes, init_file, src, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for mode in modes:
            _check_layout(mode, src, out / mode)
    finally:
        dist.destroy_process_group()


def _check_layout(mode, src, out):
    """Load into the parallel model, compare with a single-process load, then save from every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    _, shape, names = LAYOUTS[mode]
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    reader = HFCheckpointReader(src)
    single = TinyTextModel()
    load_into_module(single, reader)

    with torch.device("meta"):
        model = TinyTextModel()
    model = _parallelize(model, mode, mesh)
    requested = []
    real_read = reader.read

    def recording_read(key, dtype=None, *, offset=None, shape=None):
        requested.append((key, tuple(shape)))
        return real_read(key, dtype, offset=offset, shape=shape)

    reader.read = recording_read
    load_into_module(model, reader)
    reader.read = real_read
    for module in model.modules():
        if hasattr(module, "rope_init"):
            module.rope_init()

    state, reference = model.state_dict(), single.state_dict()
    assert {k for k, _ in requested} == set(state), "read keys other than the module's own"
    if "pp" in names:
        assert len(state) < len(reference)
    n_sharded = 0
    for key, shape_read in requested:
        value = state[key]
        local = value.to_local() if isinstance(value, DTensor) else value
        assert shape_read == tuple(local.shape), (key, shape_read, local.shape)
        n_sharded += local.numel() < value.numel()
    assert n_sharded > 0 or "tp" not in names and "dp" not in names
    for key, value in state.items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        assert not full.is_meta and torch.equal(full, reference[key]), key
    if "pp" not in names:  # the parallel model runs (TP sums partial products: equal up to rounding)
        with torch.no_grad():
            torch.testing.assert_close(model(TOKENS), single(TOKENS), rtol=1e-5, atol=1e-5)

    config = reader.config
    # Under PP a rank may hold several stage modules; pass this one as a list to exercise that form.
    parts = [model] if "pp" in names else model
    save_distributed(parts, out / "bf16", config=config, source_dir=src, mesh=mesh, max_shard_bytes=SHARD_BYTES)
    fp8 = dict(fp8_keys=reader.fp8_keys(), activation_scales=reader.activation_scales())
    save_distributed(parts, out / "fp8", config=config, source_dir=src, mesh=mesh, max_shard_bytes=SHARD_BYTES, **fp8)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_checkpoint(tiny_hf_model(), tmp_path_factory.mktemp("src"), shards=2)


def _tensors(directory):
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for key, name in index.items():
        with safe_open(directory / name, framework="pt") as f:
            out[key] = f.get_tensor(key)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_load_and_save_equal_single_process(src, tmp_path, world):
    # Spawned workers run every layout of one world size in turn. Not forked: a fork after the parent has
    # run OpenMP-parallel torch ops (any earlier test in this process) deadlocks the child in its first GEMM.
    modes = [mode for mode, layout in LAYOUTS.items() if layout[0] == world]
    args = (world, modes, str(tmp_path / "init"), src, tmp_path / "dist")
    mp.start_processes(_worker, args=args, nprocs=world, join=True, start_method="spawn")
    for mode in modes:
        _compare_saves(src, tmp_path / "dist" / mode, tmp_path / "single" / mode, mode)


def _compare_saves(src, out, single_dir, mode):
    reader = HFCheckpointReader(src)
    single = TinyTextModel()
    load_into_module(single, reader)
    fp8 = dict(fp8_keys=reader.fp8_keys(), activation_scales=reader.activation_scales())
    for kind, extra in (("bf16", {}), ("fp8", fp8)):
        expected = write_hf_checkpoint(
            single.state_dict(),
            single_dir / kind,
            config=reader.config,
            source_dir=src,
            max_shard_bytes=SHARD_BYTES,
            **extra,
        )
        got = out / kind
        if "pp" in mode:  # stages cut the shards at their boundary; the tensors and metadata are the same
            ours, theirs = _tensors(got), _tensors(expected)
            assert ours.keys() == theirs.keys()
            for key, value in theirs.items():
                bits = ours[key].reshape(-1).view(torch.uint8)
                assert ours[key].dtype == value.dtype and torch.equal(bits, value.reshape(-1).view(torch.uint8)), key
            assert (got / "config.json").read_bytes() == (expected / "config.json").read_bytes()
        else:  # file for file, byte for byte
            assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in expected.iterdir())
            for path in expected.iterdir():
                assert (got / path.name).read_bytes() == path.read_bytes(), path.name
        assert not [p for p in out.iterdir() if p.name.startswith(".")]
