"""The planner's padding model: the recipe's padding per layout, and the expected longest sample of a batch."""

import json

import numpy as np
import pytest
from torchtune_mistral3.planning._padding_model import (
    expected_longest,
    image_tokens,
    medpix_sample_lengths,
    padding_mode,
)


def test_expected_longest_hand_derived():
    # lengths 1 and 2, equally likely: max of two draws is 1 only if both are 1 (1/4): 1/4 + 2 * 3/4 = 1.75
    assert expected_longest([1, 2], 2, cap=10) == pytest.approx(1.75)
    assert expected_longest([1, 2], 1, cap=10) == pytest.approx(1.5)
    assert expected_longest([1, 2], 2, cap=1) == pytest.approx(1.0)  # truncated at max_seq_len
    with pytest.raises(ValueError, match="draws=0"):
        expected_longest([1, 2], 0, cap=10)


@pytest.mark.parametrize("batch", [1, 2, 4, 8])
def test_expected_longest_matches_the_shuffled_sampler_on_a_sampled_workload(batch):
    lengths = medpix_sample_lengths(600, max_image_size=1024, seed=3)
    # what the recipe's loader does: each epoch a permutation of the rows, dealt into full batches, each padded to
    # its longest sample (here also capped at max_seq_len 1024)
    rng = np.random.default_rng(0)
    longest = []
    for _ in range(400):
        order = rng.permutation(len(lengths))[: len(lengths) // batch * batch]
        longest += list(np.minimum(lengths[order], 1024).reshape(-1, batch).max(axis=1))
    assert expected_longest(lengths, batch, cap=1024) == pytest.approx(np.mean(longest), rel=0.01)


def test_medpix_model_is_what_is_known_of_the_data():
    lengths = medpix_sample_lengths(20000, max_image_size=1024)
    assert 550 < lengths.mean() < 600  # ~575 tokens per sample (4,600 per step of 8)
    # smallest: a 256 x 128 image (10 rows of 5 + 1), 10 question and 5 answer tokens; largest: a 1024 px square
    assert lengths.min() >= 10 * 6 + 10 + 5 + 4 and lengths.max() <= 37 * 38 + 30 + 600 + 4


def test_image_tokens_follow_the_pixtral_layout():
    # a 1024 x 512 image: 37 rows... resized only above max_image_size; rows x (cols + 1)
    assert image_tokens(512, 1024, 1024) == 19 * (37 + 1)
    assert image_tokens(2048, 1024, 1024) == 37 * (19 + 1)  # halved to 1024 x 512
    assert image_tokens(56, 56, 1024) == 2 * 3


@pytest.mark.parametrize(
    "layout,mode",
    [
        (dict(packed=False, pp=1, tp=1, compile=True), "longest"),  # one GPU: the recipe pads to the longest
        (dict(packed=False, pp=1, tp=2, compile=False), "longest"),
        (dict(packed=False, pp=1, tp=2, compile=True), "max_seq_len"),  # static shapes of compiled TP blocks
        (dict(packed=False, pp=2, tp=1, compile=False), "max_seq_len"),  # pipeline stages
        (dict(packed=True, pp=1, tp=1, compile=True), "packs"),
    ],
)
def test_padding_mode_follows_the_recipe(layout, mode):
    assert padding_mode(**layout) == mode


def test_plan_computes_the_longest_of_the_batch_on_one_gpu_and_max_seq_len_under_pp(capsys, tmp_path):
    from torchtune_mistral3.planning import main

    lengths = [300] * 3 + [1500]  # the longest of 4 draws: 1500 unless all four are 300 ((3/4)^4)
    path = tmp_path / "lengths.json"
    path.write_text(json.dumps({"sample_lengths": lengths}))
    assert main(["--config", "ministral3_3b_medpix_single_device", "plan.json=True",
                 f"plan.sample_lengths={path}"]) in (0, 1)
    step = json.loads(capsys.readouterr().out)["step"]
    expected = 300 * 0.75**4 + 1500 * (1 - 0.75**4)
    assert step["padding"] == "longest" and step["padded_seq_len"] == pytest.approx(expected)
    assert step["tokens"] == round(8 * expected)  # batch 4 x accumulation 2
    assert step["real_tokens"] == pytest.approx(8 * np.mean(lengths))
    main(["--config", "ministral3_3b_medpix_single_device", "plan.json=True", f"plan.sample_lengths={path}",
          "pipeline_parallel_dim=2", "plan.world_size=2"])
    step = json.loads(capsys.readouterr().out)["step"]
    assert step["padding"] == "max_seq_len" and step["tokens"] == 8 * 2048
    bad = tmp_path / "bad.json"
    bad.write_text("[0, 3]")
    with pytest.raises(SystemExit):
        main(["--config", "ministral3_3b_medpix_single_device", f"plan.sample_lengths={bad}"])
    assert "plan.sample_lengths" in capsys.readouterr().err
