"""Tensor parallel plan and helpers; TP=2 and FSDP=2 x TP=2 training equal to one process."""

import pytest
import torch
from _parallel_harness import build_mistral3, build_model, run_layout
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel
from torchtune_mistral3.models.mistral3._parallelism import mistral3_pp_stage_extras, mistral3_tp_plan
from torchtune_mistral3.training import (
    apply_tensor_parallel,
    check_async_tensor_parallel,
    check_sequence_parallel_length,
    cut_pipeline_stage,
    resolve_tp_plan,
    uses_loss_parallel,
    uses_sequence_parallel,
)


class TestPlan:
    def test_plan_styles(self):
        plan = mistral3_tp_plan()
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert isinstance(plan[f"decoder.layers.*.attn.{proj}"], ColwiseParallel)
        assert isinstance(plan["decoder.layers.*.attn.output_proj"], RowwiseParallel)
        assert isinstance(plan["decoder.layers.*.mlp.w1"], ColwiseParallel)
        assert isinstance(plan["decoder.layers.*.mlp.w3"], ColwiseParallel)
        assert isinstance(plan["decoder.layers.*.mlp.w2"], RowwiseParallel)
        assert isinstance(plan["tok_embeddings"], RowwiseParallel)
        assert not any(k.startswith("encoders") for k in plan)  # vision tower + projector replicated
        assert uses_loss_parallel(plan)
        gathered = mistral3_tp_plan(loss_parallel=False)
        assert not uses_loss_parallel(gathered)
        assert tuple(gathered["decoder.output"].output_layouts) == (Replicate(),)
        assert tuple(plan["decoder.output"].output_layouts) == (Shard(-1),)

    def test_plan_resolves_to_the_stage_modules_only(self):
        model = build_model()
        full = resolve_tp_plan(model, mistral3_tp_plan())
        assert len(full) == 2 + 4 * 7  # embedding, head, 7 projections per layer
        middle = resolve_tp_plan(cut_pipeline_stage(model, 1, [1, 2, 1]), mistral3_tp_plan())
        assert sorted({k.split(".")[2] for k in middle}) == ["1", "2"]
        assert all(k.startswith("decoder.layers.") for k in middle)  # no Identity embedding / head
        for name, _ in middle.items():
            assert isinstance(model.get_submodule(name), nn.Linear)

    def test_sequence_parallel_plan(self):
        assert not uses_sequence_parallel(mistral3_tp_plan())  # the default stays plain Megatron TP
        plan = mistral3_tp_plan(sequence_parallel=True)
        assert uses_sequence_parallel(plan) and uses_loss_parallel(plan)
        for norm in ("decoder.layers.*.sa_norm", "decoder.layers.*.mlp_norm", "decoder.norm"):
            assert isinstance(plan[norm], SequenceParallel)
        for proj in ("attn.output_proj", "mlp.w2"):  # reduce-scatter back to the sequence shard
            assert tuple(plan[f"decoder.layers.*.{proj}"].output_layouts) == (Shard(1),)
        assert tuple(plan["decoder.output"].input_layouts) == (Shard(1),)
        assert tuple(plan["tok_embeddings"].output_layouts) == (Replicate(),)  # fused with images replicated
        assert isinstance(plan["decoder.layers.*.mlp"], PrepareModuleInput)  # all-gathered
        assert "decoder.layers.0" in plan  # the replicated fused hidden state -> this rank's slice
        gathered = mistral3_tp_plan(loss_parallel=False, sequence_parallel=True)
        assert tuple(gathered["decoder.output"].output_layouts) == (Replicate(),)

    def test_sequence_parallel_plan_resolves_per_stage(self):
        model = build_model()
        plan = mistral3_tp_plan(sequence_parallel=True)
        full = resolve_tp_plan(model, plan)
        # embedding, head, final norm, layer 0's slice; per layer 7 projections, 2 norms, attention and MLP inputs
        assert len(full) == 4 + 4 * 11
        split = [1, 2, 1]
        stages = [resolve_tp_plan(cut_pipeline_stage(model, i, split), plan) for i in range(3)]
        assert ["decoder.layers.0" in s for s in stages] == [True, False, False]
        assert ["decoder.norm" in s for s in stages] == [False, False, True]

    def test_sequence_parallel_length_fails_with_indivisible_max_seq_len(self):
        check_sequence_parallel_length(512, 8)
        for bad in (None, 510):
            with pytest.raises(ValueError, match=rf"tensor_parallel_dim=4.*tokenizer.max_seq_len \({bad}\)"):
                check_sequence_parallel_length(bad, 4)

    def test_async_tensor_parallel_fails_without_cuda_compile_and_sequence_parallel(self, monkeypatch):
        monkeypatch.delenv("TORCH_COMPILE_BACKEND", raising=False)
        ready = dict(device_type="cuda", compile=True, sequence_parallel=True)
        check_async_tensor_parallel(True, **ready)
        check_async_tensor_parallel(False, device_type="cpu", compile=False, sequence_parallel=False)  # off: no check
        for key, value, named in [
            ("device_type", "cpu", "a CUDA device"),
            ("compile", False, "compile=True"),
            ("sequence_parallel", False, "tensor_parallel_plan.sequence_parallel=True"),
        ]:
            with pytest.raises(ValueError, match=f"tensor_parallel_async=True needs {named}"):
                check_async_tensor_parallel(True, **{**ready, key: value})
        monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")  # no inductor, no micro-pipeline pass
        with pytest.raises(ValueError, match="TORCH_COMPILE_BACKEND=aot_eager"):
            check_async_tensor_parallel(True, **ready)

    def test_pp_stage_extras(self):
        assert set(mistral3_pp_stage_extras()) == {"first_stage_extra", "last_stage_extra"}


def test_sequence_parallel_fails_with_indivisible_sequence(fake_tp2_mesh):
    model = build_mistral3()
    apply_tensor_parallel(model, fake_tp2_mesh, mistral3_tp_plan(sequence_parallel=True))
    with pytest.raises(ValueError, match=r"multiples of tensor_parallel_dim=2, got 7 tokens"):
        model.decoder.layers[0](torch.randn(1, 7, 64))  # the fused hidden state of 7 tokens


@pytest.mark.parametrize("loss_parallel", [True, False], ids=["loss-parallel", "gathered-logits"])
def test_tp2_matches_single_process(loss_parallel):
    reports = run_layout(2, pp=1, tp=2, loss_parallel=loss_parallel)
    for r in reports:
        print(f"tp2 {r['logits']} rank {r['rank']} holds {r['local_numel']}/{r['full_numel']}", r["diffs"])
    expected = ["DTensor(Shard(dim=2),):32/64"] if loss_parallel else ["Tensor:64"]
    assert all(r["logits"] == expected for r in reports)


def test_fsdp2_tp2_matches_single_process():
    reports = run_layout(4, pp=1, tp=2)
    for r in reports:
        print(f"fsdp2 x tp2 rank {r['rank']} holds {r['local_numel']}/{r['full_numel']}", r["diffs"])
        assert r["local_numel"] < 0.4 * r["full_numel"]
