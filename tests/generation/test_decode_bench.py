"""bench/decode.py on the tiny slice (CPU, fp32): it runs, and the plugin's greedy tokens equal transformers'."""

import json
from pathlib import Path

from tests.conftest import load_bench

REPO = Path(__file__).resolve().parents[2]


def _bench():
    return load_bench("decode")


def test_decode_bench_tiny_cpu_tokens_agree_with_transformers(tmp_path):
    out = tmp_path / "decode.json"
    # the compiled decode step through dynamo's aot_eager backend: fullgraph, one graph for all calls of a batch size
    result = _bench().main([
        "--tiny", "--device", "cpu", "--batches", "2", "--new-tokens", "6",
        "--variants", "plugin_eager,plugin_compile,hf_eager,hf_static", "--compile-backend", "aot_eager",
        "--out", str(out),
    ])
    assert json.loads(out.read_text())["tokens_agree"] == result["tokens_agree"]
    # (hf_static: transformers' static cache, uncompiled off CUDA)
    assert result["tokens_agree"] == {"plugin_eager_b2": 1.0, "plugin_compile_b2": 1.0, "hf_static_b2": 1.0}
    rows = {r["variant"]: r for r in result["rows"]}
    assert all("error" not in r for r in rows.values()), rows
    assert rows["plugin_compile"]["compiled_graphs"] == 1
    assert rows["hf_eager"]["decode_vs_hf_eager"] == 1.0 and rows["plugin_eager"]["decode_tokens_per_s"] > 0
