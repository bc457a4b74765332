"""The precision policy: config keys, FSDP2 mixed precision against its definition, stochastic rounding, FP8 filter."""

import json

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torchtune_mistral3.checkpointing import DEMO_HF_CONFIG
from torchtune_mistral3.planning._memory_plan import build_meta_model
from torchtune_mistral3.training import StochasticRoundingAdamW, convert_to_fp8, precision_policy, shard_model
from torchtune_mistral3.training._precision import is_decoder_linear

CPU = torch.device("cpu")


def _policy(**keys):
    return precision_policy(OmegaConf.create(keys), CPU)


def test_policy_keys():
    default = _policy(dtype="bf16")
    assert (default.compute_dtype, default.master_dtype, default.reduce_dtype) == (
        torch.bfloat16,
        torch.float32,
        torch.float32,
    )
    assert default.casts_parameters
    mp = default.mp_policy()
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)

    pure = _policy(dtype="bf16", master_dtype="bf16")
    assert pure.reduce_dtype == torch.bfloat16 and not pure.casts_parameters and pure.mp_policy() is None
    pure_fp32_reduce = _policy(dtype="bf16", master_dtype="bf16", reduce_dtype="fp32").mp_policy()
    assert (pure_fp32_reduce.param_dtype, pure_fp32_reduce.reduce_dtype) == (None, torch.float32)
    fp32 = _policy(dtype="fp32")
    assert fp32.master_dtype == torch.float32 and fp32.mp_policy() is None

    sr = _policy(
        dtype="bf16",
        master_dtype="bf16",
        optimizer={"_component_": "torchtune_mistral3.training.StochasticRoundingAdamW"},
    )
    assert sr.master_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"dtype": "bf16", "master_dtype": "fp16"}, "master_dtype=fp16 is not a precision this recipe trains in"),
        ({"dtype": "bf16", "reduce_dtype": "fp8"}, "reduce_dtype=fp8 is not a precision"),
        ({"dtype": "fp32", "master_dtype": "bf16"}, "Set master_dtype=fp32"),
        (
            {"dtype": "bf16", "optimizer": {"_component_": "torchao.optim._AdamW", "bf16_stochastic_round": True}},
            "Set master_dtype=bf16",
        ),
        (
            {"dtype": "bf16", "optimizer": {"_component_": "torchtune_mistral3.training.StochasticRoundingAdamW"}},
            "Set master_dtype=bf16",
        ),
        ({"dtype": "bf16", "fp8_recipe": "blockwise"}, "fp8_recipe=blockwise is unknown"),
        ({"dtype": "bf16", "fp8_recipe": "rowwise"}, "this run is on cpu. Set fp8_recipe=null"),
    ],
)
def test_policy_refuses(keys, message):
    with pytest.raises(ValueError, match=message):
        _policy(**keys)


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Sequential(nn.Linear(32, 32), nn.SiLU()), nn.Linear(32, 8))


def test_mixed_precision_on_a_mesh_of_one_is_bf16_compute_into_fp32_master(one_process_group):
    """FSDP2 on a data-parallel mesh of 1 (what the recipe runs without data parallelism), against its definition:
    bf16 copies of the weights for forward and backward, their gradients accumulated in fp32 into fp32 masters."""
    torch.manual_seed(1)
    micro_batches = [(torch.randn(4, 16), torch.randn(4, 8)) for _ in range(2)]

    ref = _tiny()
    for x, y in micro_batches:
        compute = {n: p.detach().to(torch.bfloat16).requires_grad_() for n, p in ref.named_parameters()}
        out = torch.func.functional_call(ref, compute, (x.to(torch.bfloat16),))
        ((out.float() - y) ** 2).sum().backward()
        for n, p in ref.named_parameters():
            g = compute[n].grad.float()
            p.grad = g if p.grad is None else p.grad + g
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    model = _tiny()
    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    shard_model(
        model,
        [lambda n, m: n == "2"],
        cpu_offload=False,
        reshard_after_forward=True,
        dp_mesh=mesh["dp"],
        mp_policy=_policy(dtype="bf16").mp_policy(),
    )
    for x, y in micro_batches:
        ((model(x).float() - y) ** 2).sum().backward()
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad.full_tensor(), ref_grads[n], rtol=0, atol=0, msg=n)
    # the fp32 grads are not bf16-rounded sums: accumulation happened in fp32
    g = model[0].weight.grad.full_tensor()
    assert not torch.equal(g, g.to(torch.bfloat16).float())


def test_frozen_parameters_in_bf16_give_the_fp32_master_results(one_process_group):
    """Frozen layers held in bf16 (no master) give the losses and gradients of frozen fp32 masters cast by FSDP2."""
    torch.manual_seed(1)
    x, y = torch.randn(4, 16), torch.randn(4, 8)
    policy = _policy(dtype="bf16")
    results = []
    for store in (False, True):
        model = _tiny()
        model[0].requires_grad_(False)  # a frozen first layer, as the vision tower is
        if store:
            assert policy.store_frozen_in_compute_dtype(model) == 16 * 32 + 32
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
        shard_model(model, [lambda n, m: n == "2"], cpu_offload=False, reshard_after_forward=True,
                    dp_mesh=mesh["dp"], mp_policy=policy.mp_policy())
        loss = ((model(x).float() - y) ** 2).sum()
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
        frozen, trained = model[0].weight, model[3].weight
        assert frozen.dtype == (torch.bfloat16 if store else torch.float32) and trained.dtype == torch.float32
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys() and "0.weight" not in grads_a
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=0, atol=0, msg=n)
    assert _policy(dtype="bf16", master_dtype="bf16").store_frozen_in_compute_dtype(_tiny()) == 0


def test_stochastic_rounding_keeps_updates_that_round_to_nearest_loses():
    """Updates far below half a bf16 ulp: the mean of the stochastically rounded weights follows fp32 AdamW."""
    steps, lr = 50, 1e-4
    torch.manual_seed(0)
    grads = [torch.rand(4096) + 0.5 for _ in range(steps)]  # one sign: the fp32 weights drift steadily
    w0 = torch.full((4096,), 1.0)  # bf16 ulp at 1.0 is 2**-7: an Adam step of ~1e-4 is 1/78 of it

    master = nn.Parameter(w0.clone())
    ref = torch.optim.AdamW([master], lr=lr, weight_decay=0.0)
    nearest = nn.Parameter(w0.to(torch.bfloat16))
    rtn = torch.optim.AdamW([nearest], lr=lr, weight_decay=0.0)
    sr_param = nn.Parameter(w0.to(torch.bfloat16))
    sr = StochasticRoundingAdamW([sr_param], lr=lr, weight_decay=0.0)
    for g in grads:
        for p, opt in ((master, ref), (nearest, rtn), (sr_param, sr)):
            p.grad = g.to(p.dtype)
            opt.step()
    moved = (w0 - master.detach()).abs().mean()
    assert moved > 0.8 * steps * lr  # fp32 moved by ~ steps * lr
    assert torch.equal(nearest.detach().float(), w0)  # round to nearest kept nothing
    assert sr_param.dtype == torch.bfloat16 and sr.state[sr_param]["exp_avg"].dtype == torch.bfloat16
    err = (sr_param.detach().float() - master.detach()).mean().abs()
    assert err < 0.1 * moved, (err, moved)


def test_stochastic_rounding_step_brackets_the_fp32_adamw_step():
    torch.manual_seed(0)
    w = (torch.randn(1000) * 0.02).to(torch.bfloat16)
    g = torch.randn(1000)
    ref = nn.Parameter(w.float())
    opt = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.1)
    ref.grad = g
    opt.step()
    p = nn.Parameter(w.clone())
    sr = StochasticRoundingAdamW([p], lr=1e-3, weight_decay=0.1)
    p.grad = g.to(torch.bfloat16)
    sr.step()
    # torch's AdamW on bf16 grads: the same update up to the grad's rounding, then rounded to a bf16 neighbour
    exact = ref.detach()
    down = exact.to(torch.bfloat16)
    lo, hi = torch.minimum(down.float(), exact), torch.maximum(down.float(), exact)
    ulp = (exact.abs() * 2**-7).clamp(min=1e-30)
    assert ((p.detach().float() >= lo - 1.01 * ulp) & (p.detach().float() <= hi + 1.01 * ulp)).all()


def test_fp8_filter_converts_exactly_the_decoder_layer_linears(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DEMO_HF_CONFIG))
    model = build_meta_model(str(tmp_path))
    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    decoder_layer_linears = {n for n in linears if n.split(".")[:2] == ["decoder", "layers"]}
    assert decoder_layer_linears and linears - decoder_layer_linears  # both kinds exist
    weights = {n: model.get_submodule(n).weight for n in linears}

    assert convert_to_fp8(model, "tensorwise") == len(decoder_layer_linears)

    from torchao.float8.float8_linear import Float8Linear

    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert converted == decoder_layer_linears
    for n in linears - decoder_layer_linears:  # vision tower, projector, head stay plain
        assert type(model.get_submodule(n)) is nn.Linear, n
    for n in linears:  # the swap keeps the parameters (so the checkpoint loads into them)
        assert model.get_submodule(n).weight is weights[n], n
    assert not is_decoder_linear(model.get_submodule("decoder.layers.0.attn.q_proj"), "decoder.layers.0.attn.q_proj")
