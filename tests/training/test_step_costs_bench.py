"""bench/step_costs.py runs end to end (tiny widths, CPU) and writes a table the step-time planner reads."""

import importlib.util
import json
from pathlib import Path

from torchtune_mistral3.training._step_plan import CostTable, predict_slice

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("step_costs", REPO / "bench" / "step_costs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
