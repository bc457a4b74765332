"""bench/step_costs.py runs end to end (tiny widths, CPU) and writes a table the step-time planner reads."""

import json
from pathlib import Path

from torchtune_mistral3.planning._step_plan import CostTable, predict_slice

from tests.conftest import load_bench

REPO = Path(__file__).resolve().parents[2]


def _bench():
    return load_bench("step_costs")


def test_tiny_cpu_run_writes_a_table_the_planner_reads(tmp_path):
    out = tmp_path / "costs.json"
    _bench().main(["--tiny", "--device", "cpu", "--no-compile", "--iters", "1", "--warmup", "0",
                   "--shapes", "1x1024", "--first-cases", "1x2048", "--middle-cases", "1x1024",
                   "--middle-layers", "2", "--first-layers", "1", "--budget-s", "900", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["skipped"] == []
    table = CostTable(data)
    assert {r["ac"] for r in data["layer"]["1"]} == {False, True} and data["layer"]["2"]
    assert len(data["slice_first"]) == 1 and len(data["slice_middle"]) == 2
    for kind in ("slice_first", "slice_middle"):
        for record in data[kind]:
            assert predict_slice(table, kind, record) > 0
