"""bench/precision.py on CPU (``--tiny``): every variant starts from the same weights and the script's arithmetic
(the forward + backward / optimizer split, the ratios) is what it says."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_tiny_run_starts_every_variant_from_the_same_weights(tmp_path):
    out = tmp_path / "precision.json"
    cmd = [sys.executable, str(REPO / "bench" / "precision.py"), "--tiny", "--device", "cpu", "--steps", "1",
           "--warmup", "0", "--curve-steps", "2", "--variants", "bf16,mixed,sr", "--accum", "4", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["timing"]] == ["bf16", "mixed", "sr"]
    for r in result["timing"]:
        assert r["step_s_at_accum"] == pytest.approx(4 * r["median_fwd_bwd_s"] + r["median_optimizer_s"])
    # bf16 compute of the same initial weights: the first losses agree (fp32 masters round to the same bf16)
    curves = result["curves"]
    assert set(curves) == {"bf16", "mixed"}
    assert curves["mixed"][0] == pytest.approx(curves["bf16"][0], rel=1e-6)
    assert curves["mixed"][1] != curves["mixed"][0]  # the optimizer step changed the weights
    assert result["curve_gap_vs_bf16"]["mixed"] == pytest.approx(
        (sum(curves["mixed"]) / 2) / (sum(curves["bf16"]) / 2) - 1
    )

