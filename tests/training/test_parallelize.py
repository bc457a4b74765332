"""The parallel layout of a model part, applied without a recipe: its order's effects, step by step.

A fake 4-rank process group in this one process (torch's fake backend) holds a (pp 1, dp 2, tp 2) mesh; nothing
here runs a collective. The reference is the recipe's layout as it was written before it became a function: the
same calls, in that order, one by one (``_by_hand``).
"""

import torch
import torch.distributed as dist
from _parallel_harness import build_mistral3
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard
from torchtune import modules
from torchtune import training as tt
from torchtune_mistral3.models.mistral3 import mistral3_tp_plan
from torchtune_mistral3.training import (
    ParallelDims,
    PrecisionPolicy,
    apply_tensor_parallel,
    compile_blocks,
    is_stage_stand_in,
    materialize,
    parallelize_model,
    set_fsdp_gradient_sum,
    shard_model,
    split_image_encoders,
)

FP32 = PrecisionPolicy(torch.float32, torch.float32, torch.float32)
BF16_COMPUTE = PrecisionPolicy(torch.bfloat16, torch.float32, torch.float32)


def _fake_mesh(world: int, tp: int):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    return ParallelDims(world, tp=tp).build_mesh("cpu")


def _meta_model():
    with torch.device("meta"):
        return build_mistral3()


def _by_hand(model, mesh, plan):
    """The recipe's layout before it was one function: TP -> tower split -> AC -> compile -> FSDP2 -> switches."""
    apply_tensor_parallel(model, mesh["tp"], plan)
    split_image_encoders(model, mesh["tp"])
    tt.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    compile_blocks(model, static_decoder_shapes=True, verbose=False)
    shard_model(
        model=model,
        shard_conditions=[lambda n, m: not is_stage_stand_in(m) and tt.get_shard_conditions(n, m, None)],
        cpu_offload=False, reshard_after_forward=True, dp_mesh=mesh["dp"], mp_policy=FP32.mp_policy(),
    )
    set_fsdp_gradient_sum(model)
    model.set_reduce_scatter_unused_params(True)
    return model


def _structure(model):
    """Module types, compiled forwards, FSDP settings and every parameter's layout, by name."""
    mods = {}
    for name, m in model.named_modules():
        groups = m._get_fsdp_state()._fsdp_param_groups if isinstance(m, FSDPModule) else []
        mods[name] = (
            type(m).__name__,
            "forward" in vars(m),  # compiled (or split) in place
            [(g.gradient_divide_factor, g.reduce_scatter_unused_params) for g in groups],
        )
    params = {
        n: (type(p).__name__, p.device_mesh.mesh_dim_names, tuple(str(x) for x in p.placements), tuple(p.shape))
        if isinstance(p, DTensor) else (type(p).__name__, tuple(p.shape))
        for n, p in model.named_parameters()
    }
    return mods, params


def test_layout_equals_the_recipe_order_and_nests_tp_in_ac_in_fsdp():
    mesh = _fake_mesh(4, tp=2)
    try:
        plan = mistral3_tp_plan()
        model = parallelize_model(
            _meta_model(), mesh, precision=FP32, tp_plan=plan, tower_split=True, activation_checkpointing=True,
            compile=True, static_shapes=True,
        )
        assert _structure(model) == _structure(_by_hand(_meta_model(), mesh, plan))

        layers = model.decoder.layers
        for layer in layers:
            # FSDP2 unit (outermost) -> activation checkpoint wrapper -> the block, compiled in place
            assert isinstance(layer, FSDPModule) and isinstance(layer, CheckpointWrapper)
            block = layer._checkpoint_wrapped_module
            assert isinstance(block, modules.TransformerSelfAttentionLayer) and "forward" in vars(block)
            group = layer._get_fsdp_state()._fsdp_param_groups[0]
            assert group.gradient_divide_factor == 1.0 and group.reduce_scatter_unused_params
        # TP before FSDP2: the TP shards are sharded again over dp (2-D DTensors, TP placement last)
        attn = layers[0]._checkpoint_wrapped_module.attn
        for proj, tp_dim in ((attn.q_proj, 0), (attn.output_proj, 1)):
            w = proj.weight
            assert isinstance(w, DTensor) and w.device_mesh.mesh_dim_names == ("dp", "tp")
            assert w.placements[-1] == Shard(tp_dim)
        # the tower split patched the encoder outside the compiled blocks
        encoder = model.encoders["image"]
        assert "forward" in vars(encoder) and encoder._tp_split_group is mesh["tp"].get_group()
    finally:
        dist.destroy_process_group()


def test_fsdp2_runs_on_one_data_parallel_rank_only_to_cast_the_weights():
    mesh = _fake_mesh(1, tp=1)
    try:
        plain = parallelize_model(_meta_model(), mesh, precision=FP32)
        assert not any(isinstance(m, FSDPModule) for m in plain.modules())
        assert not any(isinstance(p, DTensor) for p in plain.parameters())
        cast = parallelize_model(_meta_model(), mesh, precision=BF16_COMPUTE)
        assert isinstance(cast.decoder.layers[0], FSDPModule) and not isinstance(cast, CheckpointWrapper)
        policy = cast._get_fsdp_state()._mp_policy
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    finally:
        dist.destroy_process_group()


def test_materialize_allocates_the_part_and_computes_rope():
    mesh = _fake_mesh(1, tp=1)
    try:
        model = materialize(parallelize_model(_meta_model(), mesh, precision=FP32), torch.device("cpu"),
                            rope_dtype=torch.float32)
        reference = build_mistral3()  # built on the CPU: its RoPE caches are the truth
        got = dict(model.named_buffers())
        want = dict(reference.named_buffers())
        assert got.keys() == want.keys() and got
        for name, buffer in want.items():
            torch.testing.assert_close(got[name], buffer, rtol=0, atol=0, msg=name)
        assert all(p.device.type == "cpu" for p in model.parameters())
    finally:
        dist.destroy_process_group()
