"""bench/packed_layer.py runs end to end (tiny widths, CPU) and writes what the recorded H200 runs hold."""

import json
from pathlib import Path

from tests.conftest import load_bench

REPO = Path(__file__).resolve().parents[2]


def test_tiny_cpu_run_writes_the_recorded_runs_fields(tmp_path):
    out = tmp_path / "packed_layer.json"
    load_bench("packed_layer").main(["--tiny", "--device", "cpu", "--no-compile", "--packs", "1,2", "--samples", "8",
                                     "--iters", "1", "--warmup", "0", "--out", str(out)])
    tiny = json.loads(out.read_text())
    assert [c["packs"] for c in tiny["cases"]] == [1, 2]
    for case in tiny["cases"]:
        for variant in ("causal", "dense"):  # no flex on the CPU (no backward there)
            assert case[variant]["s_per_microbatch"] > 0
    recorded = json.loads((REPO / "bench" / "results" / "packed_layer_tp8_h200.json").read_text())
    assert set(tiny) <= set(recorded)
    for case in recorded["cases"]:
        assert set(tiny["cases"][0]) - {"planner_s"} <= set(case)
        assert {"causal", "dense", "flex", "causal_fp8", "fp8_speedup", "dense_kernels"} <= set(case)
