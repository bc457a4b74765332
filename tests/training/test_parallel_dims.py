"""Parallel degrees and their validation."""

import pytest
from _parallel_harness import build_model
from torchtune_mistral3.training import ParallelDims, validate_pipeline_stages, validate_tensor_parallel


def test_data_parallel_takes_the_rest():
    dims = ParallelDims(64, pp=8, tp=8)
    assert (dims.pp, dims.dp, dims.tp) == (8, 1, 8)
    assert ParallelDims(8, pp=2, tp=2).dp == 2
    assert ParallelDims(4).dp == 4 and not ParallelDims(4).pp_enabled


@pytest.mark.parametrize(
    "world, pp, tp, match",
    [
        (6, 4, 1, "World size 6 is not divisible by pipeline_parallel_dim \\(4\\)"),
        (8, 1, 3, "tensor_parallel_dim \\(3\\)"),
        (8, 0, 1, "pipeline_parallel_dim must be a positive integer"),
    ],
)
def test_dims_fail_with_bad_degrees(world, pp, tp, match):
    with pytest.raises(ValueError, match=match):
        ParallelDims(world, pp=pp, tp=tp)


def test_tp_fails_with_indivisible_heads():
    model = build_model()  # 4 heads, 2 kv heads, width 32
    validate_tensor_parallel(model, 2)
    with pytest.raises(ValueError, match=r"tensor_parallel_dim=4 does not divide num_kv_heads=2 .*one of \[1, 2\]"):
        validate_tensor_parallel(model, 4)


def test_pp_fails_with_more_stages_than_layers():
    validate_pipeline_stages(4, 4)
    with pytest.raises(ValueError, match="8 pipeline stages for a decoder of 4 layers"):
        validate_pipeline_stages(4, 8)


def test_from_config_reads_both_degrees_and_defaults_to_the_smallest_world():
    from omegaconf import OmegaConf
    from torchtune_mistral3.training import WorldSizeError

    cfg = OmegaConf.create({"tensor_parallel_dim": 2, "pipeline_parallel_dim": 4})
    assert ParallelDims.from_config(cfg, 16) == ParallelDims(16, pp=4, tp=2)
    assert ParallelDims.from_config(cfg) == ParallelDims(8, pp=4, tp=2)  # data parallel 1
    assert ParallelDims.from_config({}, 3) == ParallelDims(3)
    with pytest.raises(WorldSizeError, match="World size 12 is not divisible") as e:
        ParallelDims.from_config(cfg, 12)
    assert (e.value.world_size, e.value.pp, e.value.tp) == (12, 4, 2)
