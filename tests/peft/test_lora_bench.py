"""bench/lora.py on the tiny slice (CPU, fp32): the FP8 base holds one byte per frozen decoder weight and, dequantised
on the fly, trains exactly as the compute-dtype base holding the same values; the scaled_mm base trains close to it."""

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import load_bench

REPO = Path(__file__).resolve().parents[2]


def _bench():
    return load_bench("lora")


def test_lora_bench_tiny_cpu_fp8_base_matches_bf16_base(tmp_path):
    out = tmp_path / "lora.json"
    result = _bench().main(["--tiny", "--device", "cpu", "--layers", "2", "--steps", "1", "--warmup", "2",
                            "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"bf16", "fp8_dequantize", "fp8_scaled_mm"} and result["skipped"] == []
    assert all("error" not in r for r in rows.values()), rows
    # same base values, dequantised per matmul: the same losses step after step (Adam moved the adapters)
    assert rows["fp8_dequantize"]["losses"] == rows["bf16"]["losses"]
    assert len(set(rows["bf16"]["losses"])) == 3
    # scaled_mm also rounds each base matmul's input to FP8: close to, not equal to, the exact base
    scaled = rows["fp8_scaled_mm"]["losses"]
    assert scaled == pytest.approx(rows["bf16"]["losses"], rel=1e-2) and scaled != rows["bf16"]["losses"]
    assert rows["fp8_scaled_mm"]["frozen_bytes"] == rows["fp8_dequantize"]["frozen_bytes"]
    # hand count: every decoder-layer linear weight goes from 4 bytes (fp32 here) to 1 (FP8)
    from _slice import count_params, slice_hf_config  # bench/ is on sys.path once the module is loaded

    base = count_params(slice_hf_config(2, tiny=True))["decoder_layers_matmul"]
    assert rows["bf16"]["frozen_bytes"] - rows["fp8_dequantize"]["frozen_bytes"] == 3 * base
    assert rows["bf16"]["trainable_params"] == rows["fp8_dequantize"]["trainable_params"] > 0
    assert str(REPO / "bench") in sys.path
