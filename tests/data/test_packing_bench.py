"""bench/packing.py runs end to end in its CPU smoke mode, on the layouts and counts it documents."""

import json
from pathlib import Path

import pytest

from tests.conftest import load_bench

REPO = Path(__file__).resolve().parents[2]


def _bench():
    return load_bench("packing")


def test_synthetic_mix_follows_the_documented_ranges():
    bench = _bench()
    samples = bench.synthetic_mix(64, vocab=131072, tiny=False)
    for s in samples:
        (image,) = s["encoder_input"]["image"]["images"]
        h, w = image.shape[1:]
        # 300..1024 px sides, rounded up to the 28 px token grid
        assert 308 <= h <= 1036 and 308 <= w <= 1036 and h % 28 == 0 and w % 28 == 0
        answer = sum(label != -100 for label in s["labels"])
        assert 21 <= answer <= 301  # 20..300 answer tokens + </s>
        assert s["tokens"][-answer:] == s["labels"][-answer:]
    assert len({tuple(s["encoder_input"]["image"]["images"][0].shape) for s in samples}) > 32  # mixed aspect


def test_cpu_smoke_run_writes_every_measurement(tmp_path):
    bench = _bench()
    out = tmp_path / "packing.json"
    result = bench.main(["--device", "cpu", "--tiny", "--dtype", "fp32", "--layers", "1", "--samples", "4",
                         "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert json.loads(out.read_text())["ratios"] == pytest.approx(result["ratios"], nan_ok=True)
    layouts = result["layouts"]
    assert set(layouts) == {"packed", "pad_longest", "pad_max"}
    # the same real tokens in every layout; padding only differs
    slots = {name: r["token_slots"] for name, r in layouts.items()}
    assert slots["packed"] % 256 == 0 and slots["pad_max"] == 4 * 256
    assert all(r["token_slots"] * (1 - r["padding_fraction"]) == pytest.approx(result["real_tokens"])
               for r in layouts.values())
    for r in layouts.values():
        assert r["full_step"]["s"] > 0 and r["decoder_layers"]["s"] > 0 and r["projected_88_layers_s"] > 0
    assert result["tower"]["s_per_image"] > 0
    att = result["attention"]
    assert att["pad_longest_sdpa_causal"]["s"] > 0 and att["packed_sdpa_per_sample"]["s"] > 0
    assert att["max_abs_diff_sdpa_dense_mask_vs_per_sample"] < 1e-5  # fp32: the dense block mask is exact
    assert result["ratios"]["decoder_layers_packed_vs_pad_max"] > 0
