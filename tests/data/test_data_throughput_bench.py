"""bench/data_throughput.py writes its result outside the repository unless told otherwise."""

import json
import sys
from pathlib import Path

from tests.conftest import load_bench

REPO = Path(__file__).resolve().parents[2]
TRACKED = REPO / "bench" / "results" / "data_throughput.json"


def _bench():
    return load_bench("data_throughput")


def test_default_output_leaves_the_tracked_results_alone(tmp_path, monkeypatch):
    bench = _bench()
    # the measured parts are not what this checks: stand-ins keep the test fast (the real run takes minutes)
    monkeypatch.setattr(bench, "_rows", lambda n, sizes: [None] * n)
    monkeypatch.setattr(bench, "_plugin", lambda rows, tekken, size: 2.0)
    monkeypatch.setattr(bench, "_transformers", lambda rows, tekken, size: 1.0)
    default = tmp_path / "default.json"
    monkeypatch.setattr(bench, "DEFAULT_OUT", default)
    before = TRACKED.read_bytes()
    monkeypatch.setattr(sys, "argv", ["data_throughput.py", "--samples", "4"])
    bench.main()
    assert json.loads(default.read_text())["ratio_plugin_over_transformers"] == 2.0
    assert TRACKED.read_bytes() == before
    out = tmp_path / "elsewhere" / "r.json"
    monkeypatch.setattr(sys, "argv", ["data_throughput.py", "--samples", "4", "--out", str(out)])
    bench.main()
    assert json.loads(out.read_text())["samples"] == 4 and TRACKED.read_bytes() == before
    # the default is the temporary directory, not a path in the repository
    assert not _bench().DEFAULT_OUT.resolve().is_relative_to(REPO)
