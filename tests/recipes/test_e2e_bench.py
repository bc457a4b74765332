"""bench/e2e.py on CPU (smoke mode): the real `tune run` and transformers, figures recomputed from the logs."""

import re
from pathlib import Path

import numpy as np
import pytest
from torchtune_mistral3.planning._padding_model import medpix_sample_lengths

from tests.conftest import load_bench

STEPS, WARMUP, ROWS = 3, 1, 24


def _log_steps(output_dir: Path):
    """The DiskLogger file read here independently of the bench: {step: {name: value}}."""
    (log,) = (output_dir / "logs").glob("log_*.txt")
    steps = {}
    for m in re.finditer(r"Step (\d+) \| (.*)", log.read_text()):
        steps.setdefault(int(m[1]), {}).update({k: float(v) for k, v in re.findall(r"(\w+):(\S+)", m[2])})
    return steps


def test_workload_follows_the_medpix_model(tmp_path):
    bench = load_bench("e2e")
    from torchtune_mistral3.checkpointing import write_demo_checkpoint
    from torchtune_mistral3.models.mistral3 import mistral3_transform

    ckpt = write_demo_checkpoint(str(tmp_path / "ckpt"))
    transform = mistral3_transform(str(ckpt / "tekken.json"), max_seq_len=None, max_image_size=1024)
    drawn = bench.build_workload(tmp_path / "w.parquet", 40, transform, seed=0)
    measured = np.array(bench.sample_lengths(tmp_path / "w.parquet", transform)["sample_lengths"])
    model = medpix_sample_lengths(40, 1024, seed=0)
    # the same images (exact sizes) and text cut to the drawn token counts: within a few tokens of the model
    assert np.abs(measured - model).max() <= 16 and abs((measured - model).mean()) <= 3
    long_sides = [max(hw) for hw in drawn["image_hw"]]
    assert 256 <= min(long_sides) and max(long_sides) <= 1200 and len(set(drawn["image_hw"])) == 40
    # the peer's own processing (transformers' Pixtral image processor, tekken tokenizer) gives every row exactly
    # the plugin's tokens: both sides train on the same work
    peer = list(bench._peer_batches(tmp_path / "w.parquet", str(ckpt / "tekken.json"), 1024, 4096, 1, seed=0))
    order = np.random.default_rng(0).permutation(40)
    assert [int(b["attention_mask"].sum()) for b in peer] == measured[order].tolist()
    assert all(int((b["labels"] != -100).sum()) > 0 for b in peer)


@pytest.mark.integration
def test_smoke_run_reports_what_its_logs_say(tmp_path):
    bench = load_bench("e2e")
    out = tmp_path / "e2e.json"
    result = bench.main(["--smoke", "--steps", str(STEPS), "--warmup-steps", str(WARMUP), "--rows", str(ROWS),
                         "--modes", "padded,packed", "--peer", "--peer-steps", "2", "--peer-warmup", "1",
                         "--num-workers", "1", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert out.is_file()
    assert result["workload"]["mean_tokens"] > 0 and len(result["modes"]) == 2
    for mode, entry in result["modes"].items():
        assert "error" not in entry, entry.get("error")
        s = entry["summary"]
        assert entry["plan"]["step_s"] > 0  # the planner read the run's overrides and plan.* keys
        (run_dir,) = (tmp_path / "work").glob(f"run_{mode}_*")
        log = _log_steps(run_dir)
        # every step the command ran was logged and counted
        assert sorted(log) == list(range(1, entry["steps_run"] + 1)) and s["steps_logged"] == entry["steps_run"]
        assert entry["steps_run"] >= STEPS
        after = [log[k] for k in sorted(log)][WARMUP:]
        step_s = sum(x["step_time_s"] for x in after)
        # tokens/s, data wait and step time recomputed from the log file
        assert s["real_tokens_per_s_per_gpu"] == pytest.approx(sum(x["real_tokens"] for x in after) / step_s)
        assert s["data_wait_share"] == pytest.approx(sum(x["data_wait_s"] for x in after) / step_s)
        assert s["steady_step_s"] == pytest.approx(float(np.median([x["step_time_s"] for x in after])))
        assert 0 <= s["data_wait_share"] < 1 and s["recompiles_after_warmup"] == 0  # eager on CPU
        # the first step ends after the process started, loaded and took that step
        assert log[1]["step_time_s"] < s["time_to_first_step_s"] < entry["wall_s"]
        if mode == "padded":  # the shipped batch: 4 samples x 2 accumulation
            assert all(x["samples"] == 8 for x in log.values())
        else:  # packs of up to max_seq_len 512 tokens: 2 x 2 per step
            assert all(x["real_tokens"] <= 4 * 512 for x in log.values()) and s["padding_fraction"] < 0.5
    peer = result["peer"]
    assert "error" not in peer, peer.get("error")
    assert peer["real_tokens_per_s_per_gpu"] == pytest.approx(sum(peer["real_tokens"][1:]) / sum(peer["step_s"][1:]))
    assert all(np.isfinite(peer["losses"])) and len(peer["step_s"]) == 2
    ratios = result["ratios"]
    padded, packed = (result["modes"][m]["summary"]["real_tokens_per_s_per_gpu"] for m in ("padded", "packed"))
    assert ratios["packed_over_padded_real_tokens_per_s"] == pytest.approx(packed / padded)
    assert ratios["padded_over_peer_real_tokens_per_s"] == pytest.approx(padded / peer["real_tokens_per_s_per_gpu"])


def test_3b_checkpoint_config_is_the_3b_builder(tmp_path):
    import json

    import torch
    from torchtune_mistral3.checkpointing import mistral3_from_hf_config
    from torchtune_mistral3.models.mistral3 import ministral3_3b, mistral3_arguments_from_hf_config

    config = load_bench("e2e").model_hf_config("3b")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        ours, builder = mistral3_from_hf_config(str(tmp_path)), ministral3_3b()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in builder.state_dict().items()}
    args = mistral3_arguments_from_hf_config(config)
    # Ministral-3 3B's published YaRN: factor 16 over 16384 positions, Llama-4 query scale 0.1
    rope = (args["rope_scaling_factor"], args["rope_original_max_seq_len"], args["llama4_scaling_beta"])
    assert rope == (16.0, 16384, 0.1)
    assert args["tie_word_embeddings"] and args["num_layers"] == 26 and args["embed_dim"] == 3072
