"""Pipeline parallelism: stage cutting, splits, schedules, and PP=2 training equal to one process."""

import itertools

import pytest
import torch
from _parallel_harness import NUM_LAYERS, build_model, make_batch, run_layout
from torch import nn
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)
from torchtune_mistral3.training import (
    PipelineLoss,
    StageImages,
    balanced_layer_split,
    cut_pipeline_stage,
    get_pipeline_schedule_class,
    pipeline_step,
    resolve_layer_split,
    stage_ids_for_rank,
    validate_pipeline_schedule,
)


def _max_stage_cost(split, first, last):
    costs = [float(n) for n in split]
    costs[0] += first
    costs[-1] += last
    return max(costs)


class TestLayerSplit:
    def test_balanced_split_is_min_max_optimal(self):
        # Brute force over every split with >= 1 layer per stage.
        for layers, stages, (first, last) in itertools.product(range(2, 11), range(2, 5), [(1, 1), (0, 0), (2, 0.5)]):
            if stages > layers:
                continue
            best = min(
                _max_stage_cost(s, first, last)
                for s in itertools.product(range(1, layers + 1), repeat=stages)
                if sum(s) == layers
            )
            got = balanced_layer_split(layers, stages, first, last)
            assert sum(got) == layers and min(got) >= 1
            assert _max_stage_cost(got, first, last) == best, (layers, stages, first, last, got)

    def test_balanced_split_gives_ends_fewer_layers(self):
        # 88 layers + 1 + 1 layer-equivalents over 8 stages: 11.25 per stage.
        assert balanced_layer_split(88, 8) == [10, 12, 11, 11, 11, 12, 11, 10]
        assert balanced_layer_split(6, 2, 0, 0) == [3, 3]

    def test_custom_split_counts_and_boundaries(self):
        assert resolve_layer_split(16, 4, [3, 5, 5, 3]) == [3, 5, 5, 3]
        assert resolve_layer_split(16, 4, [3, 8, 13]) == [3, 5, 5, 3]

    @pytest.mark.parametrize("split", [[4, 4, 4], [0, 8, 8, 0], [8, 4], [5, 4, 9]])
    def test_custom_split_fails_with_bad_split(self, split):
        with pytest.raises(ValueError, match="pipeline_split"):
            resolve_layer_split(16, 4, split)

    def test_split_fails_with_more_stages_than_layers(self):
        with pytest.raises(ValueError, match="pipeline_parallel_dim"):
            balanced_layer_split(4, 6)


class TestSchedules:
    def test_schedule_names(self):
        assert get_pipeline_schedule_class("1f1b") is Schedule1F1B
        assert get_pipeline_schedule_class("gpipe") is ScheduleGPipe
        assert get_pipeline_schedule_class("interleaved1f1b") is ScheduleInterleaved1F1B
        with pytest.raises(ValueError, match="pipeline_schedule"):
            get_pipeline_schedule_class("2F2B")

    def test_stage_placement(self):
        assert stage_ids_for_rank(ScheduleInterleaved1F1B, 0, 2, 2) == [0, 2]
        assert stage_ids_for_rank(ScheduleInterleaved1F1B, 1, 8, 4) == [1, 9, 17, 25]  # the 128B config's layout
        assert stage_ids_for_rank(ScheduleZBVZeroBubble, 0, 2, 2) == [0, 3]
        assert stage_ids_for_rank(ScheduleZBVZeroBubble, 1, 2, 2) == [1, 2]
        assert stage_ids_for_rank(Schedule1F1B, 3, 4, 1) == [3]

    @pytest.mark.parametrize(
        "cls, n_mb, pp, per_rank, batch, match",
        [
            (Schedule1F1B, 2, 4, 1, None, "pipeline_microbatches >= pipeline stages"),
            (ScheduleInterleaved1F1B, 5, 2, 2, None, "multiple of"),
            (ScheduleZBVZeroBubble, 4, 2, 1, None, "exactly 2 stages"),
            (ScheduleDualPipeV, 2, 2, 2, None, "DualPipeV"),
            (ScheduleGPipe, 4, 2, 2, None, "one stage per rank"),
            (ScheduleGPipe, 4, 2, 1, 6, "batch_size=6"),
        ],
    )
    def test_schedule_fails_with_bad_microbatches(self, cls, n_mb, pp, per_rank, batch, match):
        with pytest.raises(ValueError, match=match):
            validate_pipeline_schedule(cls, n_mb, pp, per_rank, batch)


class TestStageCut:
    def test_stages_chain_to_the_full_model(self):
        torch.manual_seed(0)
        model = build_model()
        batch = make_batch(1, 4)
        expected = model(batch["tokens"], encoder_input=batch["encoder_input"])
        split = [1, 2, 1]
        stages = [cut_pipeline_stage(model, s, split) for s in range(3)]
        h = stages[0](batch["tokens"], encoder_input=StageImages(batch["encoder_input"]), sample_idx=torch.arange(4))
        assert h.shape == (4, batch["tokens"].shape[1], 32)
        for stage in stages[1:]:
            h = stage(h, encoder_input="ignored by later stages")
        torch.testing.assert_close(h, expected, atol=0, rtol=0)

    def test_stage_keeps_full_model_fqns_and_only_its_parameters(self):
        model = build_model()
        full = dict(model.named_parameters())
        middle = cut_pipeline_stage(model, 1, [1, 2, 1])
        names = {n for n, _ in middle.named_parameters()}
        assert names == {n for n in full if n.startswith(("decoder.layers.1.", "decoder.layers.2."))}
        first = cut_pipeline_stage(model, 0, [1, 2, 1])
        assert "decoder.tok_embeddings.weight" in first.state_dict()  # the EarlyFusionModel key is kept
        assert not any(n.startswith("decoder.output") for n, _ in first.named_parameters())
        last = cut_pipeline_stage(model, 2, [1, 2, 1])
        assert {"decoder.norm.scale", "decoder.output.weight"} <= set(dict(last.named_parameters()))
        assert not any(n.startswith(("encoders.", "tok_embeddings.")) for n, _ in last.named_parameters())
        assert dict(model.named_parameters()).keys() == full.keys()  # the model itself is untouched

    def test_stage_on_meta_device_is_cheap(self):
        with torch.device("meta"):
            model = build_model()
        stage = cut_pipeline_stage(model, 1, [2, 2])
        assert all(p.is_meta for p in stage.parameters())

    def test_cut_fails_with_tied_embeddings(self):
        from torchtune.models.llama3 import llama3
        from torchtune.modules import TiedLinear
        from torchtune.modules.model_fusion import EarlyFusionModel

        decoder = llama3(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=64)
        del decoder.output  # a tied head is a plain attribute, as torchtune builds it
        decoder.output = TiedLinear(decoder.tok_embeddings)
        model = EarlyFusionModel(decoder, {"image": nn.Linear(2, 32)}, {"image": 63})
        with pytest.raises(ValueError, match="Tied embeddings"):
            cut_pipeline_stage(model, 0, [1, 1])


class TestStageImages:
    def test_select_picks_each_samples_images(self):
        batch = make_batch(0, 4)  # 0, 1, 2, 0 images
        enc = batch["encoder_input"]["image"]
        assert enc["images_per_sample"].tolist() == [0, 1, 2, 0]
        sel = StageImages(batch["encoder_input"]).select(torch.tensor([2, 3]))["image"]
        assert sel["images_per_sample"].tolist() == [2, 0]
        torch.testing.assert_close(sel["pixel_values"], enc["pixel_values"][1:3])
        torch.testing.assert_close(sel["image_sizes"], enc["image_sizes"][1:3])
        empty = StageImages(batch["encoder_input"]).select(torch.tensor([0]))["image"]
        assert empty["pixel_values"].shape == (0, *enc["pixel_values"].shape[1:])


class TestPipelineLoss:
    def test_chunked_microbatch_losses_sum_to_the_global_mean(self):
        torch.manual_seed(0)
        logits = torch.randn(4, 12, 64)
        labels = torch.randint(0, 64, (4, 12))
        labels[0] = -100  # a microbatch with no valid labels contributes 0
        labels[2, :5] = -100
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1), ignore_index=-100)
        n = (labels != -100).sum().item()
        loss = PipelineLoss()
        total = loss(logits[:1], labels[:1], n) + loss(list(logits[1:].split(5, dim=1)), labels[1:], n)
        assert loss(logits[:1], labels[:1], n).item() == 0.0
        torch.testing.assert_close(total, expected)

    def test_label_smoothing_of_torch_cross_entropy_is_honoured(self):
        torch.manual_seed(0)
        logits = torch.randn(3, 10, 32)
        labels = torch.randint(0, 32, (3, 10))
        labels[1, :4] = -7
        torch_loss = nn.CrossEntropyLoss(ignore_index=-7, label_smoothing=0.1)
        expected = torch_loss(logits.reshape(-1, 32), labels.reshape(-1))  # torch's own mean over valid labels
        n = (labels != -7).sum().item()
        loss = PipelineLoss(torch_loss)
        total = loss(logits[:1], labels[:1], n) + loss(list(logits[1:].split(4, dim=1)), labels[1:], n)
        torch.testing.assert_close(total, expected)
        plain = nn.functional.cross_entropy(logits.reshape(-1, 32), labels.reshape(-1), ignore_index=-7)
        assert not torch.allclose(total, plain)

    @pytest.mark.parametrize(
        "loss_fn, loss_parallel, match",
        [
            (nn.NLLLoss(), False, "loss._component_=torch.nn.modules.loss.NLLLoss is not supported"),
            (nn.CrossEntropyLoss(weight=torch.ones(8)), False, "with a class weight is not supported"),
            (nn.CrossEntropyLoss(label_smoothing=0.1), True, "cannot run under loss parallel"),
        ],
    )
    def test_a_loss_it_cannot_reproduce_is_refused(self, loss_fn, loss_parallel, match):
        with pytest.raises(ValueError, match=match) as e:
            PipelineLoss(loss_fn, loss_parallel=loss_parallel)
        assert "Supported: torchtune.modules.loss.CEWithChunkedOutputLoss" in str(e.value)
        PipelineLoss(nn.CrossEntropyLoss(), loss_parallel=loss_parallel)  # plain CE runs everywhere


# Two processes, PP=2: loss, clipped norm, every gradient and the final parameters after 3 SGD steps with
# clipping equal a single-process run (asserted inside the ranks to 1e-5).
PP_LAYOUTS = {
    "1F1B": dict(schedule="1F1B", microbatches=2, stages=[[0], [1]]),
    "GPipe": dict(schedule="GPipe", microbatches=4, stages=[[0], [1]]),
    "Interleaved1F1B": dict(schedule="Interleaved1F1B", microbatches=4, stages=[[0, 2], [1, 3]]),
    "InterleavedZeroBubble": dict(schedule="InterleavedZeroBubble", microbatches=4, stages=[[0, 2], [1, 3]]),
    "ZBVZeroBubble": dict(schedule="ZBVZeroBubble", microbatches=2, stages=[[0, 3], [1, 2]]),
    "DualPipeV": dict(schedule="DualPipeV", microbatches=4, stages=[[0, 3], [1, 2]]),
}


@pytest.mark.parametrize("name", list(PP_LAYOUTS))
def test_pp2_matches_single_process(name):
    cfg = dict(PP_LAYOUTS[name])
    stages = cfg.pop("stages")
    reports = run_layout(2, pp=2, tp=1, **cfg)
    assert [r["stage_ids"] for r in reports] == stages
    assert sum(r["local_numel"] for r in reports) == reports[0]["full_numel"]
    for r in reports:
        assert r["local_numel"] < 0.6 * r["full_numel"]
        print(name, f"rank {r['rank']} holds {r['local_numel']}/{r['full_numel']} parameters", r["diffs"])
    assert NUM_LAYERS == sum(reports[0]["split"])


class _RecordingSchedule:
    def __init__(self):
        self.calls = []

    def step(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if "losses" in kwargs:  # what torch does on the last stage: one loss per microbatch
            kwargs["losses"].extend([torch.tensor(0.25), torch.tensor(0.5)])


def _pipeline(stage_ids, n_microbatches=2):
    from torchtune_mistral3.training import Pipeline

    return Pipeline(_RecordingSchedule(), [], stage_ids, 2, [2, 2], n_microbatches)


class TestPipelineStep:
    def test_first_stage_gets_tokens_images_and_sample_index(self):
        batch = make_batch(0, 4)
        labels = batch.pop("labels")
        first = _pipeline([0])
        assert pipeline_step(first, batch, labels, 10.0) is None
        args, kwargs = first.schedule.calls[0]
        assert args[0] is batch["tokens"]
        assert isinstance(kwargs["encoder_input"], StageImages)
        assert kwargs["sample_idx"].tolist() == [0, 1, 2, 3]
        assert "target" not in kwargs

    def test_last_stage_gets_labels_and_global_token_count(self):
        batch = make_batch(0, 4)
        labels = batch.pop("labels")
        last = _pipeline([1])
        assert pipeline_step(last, batch, labels, 10.0).item() == 0.75
        args, kwargs = last.schedule.calls[0]
        assert args == () and "encoder_input" not in kwargs
        assert kwargs["target"] is labels and kwargs["loss_kwargs"] == {"num_tokens": 10.0}
        assert kwargs["return_outputs"] is False

    def test_step_fails_with_changing_shape(self):
        batch = make_batch(0, 4)
        labels = batch.pop("labels")
        pipe = _pipeline([0])
        pipeline_step(pipe, batch, labels, 10.0)
        batch["tokens"] = batch["tokens"][:, :-4]
        with pytest.raises(ValueError, match="pad every batch to the same length"):
            pipeline_step(pipe, batch, labels, 10.0)

    def test_step_fails_with_indivisible_batch(self):
        batch = make_batch(0, 3)
        labels = batch.pop("labels")
        with pytest.raises(ValueError, match="pipeline_microbatches=2"):
            pipeline_step(_pipeline([0]), batch, labels, 10.0)
