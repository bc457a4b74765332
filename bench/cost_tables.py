"""The planner's shipped cost tables, derived from the recorded benchmark runs in ``bench/results``.

    python bench/cost_tables.py           # print what the recorded runs give
    python bench/cost_tables.py --write   # rewrite the planner's two derived tables with it

``step_costs_h200_provisional.json`` (:func:`derive_provisional_table`: until ``bench/step_costs.py`` has run on
the GPU) and ``packed_attention_h200.json`` (:func:`derive_packed_attention`) beside the step-time planner
(``torchtune_mistral3/planning/``). ``tests/planning/test_step_plan.py`` checks that the shipped files are what
this derives.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

from torchtune_mistral3.planning._step_plan import (
    EAGER_TIME_FACTOR,
    HBM_TBPS,
    PACKED_ATTENTION_FILE,
    PROVISIONAL_FILE,
    CostTable,
    MicroBatch,
    stage_time,
)

RESULTS = Path(os.path.dirname(os.path.abspath(__file__))) / "results"

# Issue #15's tower measurements on one H200 (compiled, bf16), the only tower-alone figures until step_costs runs:
# 8 mixed MedPix images (10,120 patches) 108 ms; one 1036 px image (5476 patches) 73 ms.
_ISSUE15_TOWER = [
    {"patches_per_image": [1265] * 8, "forward_s": 0.108},
    {"patches_per_image": [5476], "forward_s": 0.073},
]
# Assumptions of the provisional table (each replaced by a measurement in step_costs_h200.json).
_PROVISIONAL_ASSUMPTIONS = {
    "forward_share": "forward = 1/3 of a layer's forward + backward (FLOP ratio 2:4); with AC, the backward is the "
                     "rest of the AC step",
    "tp8_shard_efficiency": 0.9,
    "fp32_over_bf16_adamw": 2.0,
    "foreach_over_fused_adamw": 1.5,
    "head": "6 P_head T at the decoder layer's measured FLOP rate + 5 passes over the bf16 logits at HBM speed",
    "projector": "6 P_proj t at the decoder layer's measured FLOP rate",
    "embeddings": "HBM-bound: forward 2 T h x 2 bytes, backward 2 V h x 2 bytes, at 4.8 TB/s",
    "tower": "issue #15's two measurements (8 mixed images of 1265 patches on average; one 1036 px image)",
}


def derive_provisional_table(results_dir: str) -> Dict[str, Any]:
    """A cost table derived from the step-speed runs, until ``bench/step_costs.py`` has run on the GPU.

    From ``bench/step_speed.py`` at 4 and 8 layers: a decoder layer's forward + backward =
    (8-layer step - 4-layer step) / 4 - its share of the AdamW step (the profiled fused-AdamW kernel time per
    parameter), for 2048 x 2 and 4096 x 1, with and without activation checkpointing; the rest follows
    ``_PROVISIONAL_ASSUMPTIONS``.

    Args:
        results_dir (str): ``bench/results``.

    Returns:
        Dict[str, Any]: the table (``"provisional": True``), with the 4-layer slice's step rebuilt from it.
    """
    d = Path(results_dir)
    four = json.loads((d / "step_speed_h200.json").read_text())
    eight = json.loads((d / "step_speed_h200_8layers.json").read_text())
    final = json.loads((d / "step_speed_h200_final.json").read_text())
    pc = four["param_counts"]
    p_layer, p_head = pc["decoder_layer_matmul"], pc["lm_head"]
    h, vocab = 12288, 131072
    # fused AdamW kernel time per trained parameter, from the 4-layer profiles
    per_param = []
    for case in four["cases"]:
        r = case["variants"]["plugin_compile_c1"]
        adam = [k["ms"] for k in r["profile"]["top"] if k["kernel"].startswith("void at::native") and
                "FusedOptimizerTensorListMetadata" in k["kernel"]]
        per_param.append(adam[0] / 1e3 / r["trainable_params"])
    s_param = sum(per_param) / len(per_param)
    layer_params = p_layer + 2 * h
    rows, rates = [], []
    for c4, c8 in zip(four["cases"], eight["cases"]):
        b, s = c4["batch_size"], c4["seq_len"]
        for ac, name in ((False, "plugin_compile_c1"), (True, "plugin_compile_c1_ac")):
            total = (c8["variants"][name]["median_step_s"] - c4["variants"][name]["median_step_s"]) / 4
            total -= s_param * layer_params
            rows.append({"batch": b, "seq": s, "ac": ac, "fb_s": total})
    layer = []
    plain = {(r["batch"], r["seq"]): r["fb_s"] for r in rows if not r["ac"]}
    for r in rows:
        f = plain[(r["batch"], r["seq"])] / 3
        layer.append({"batch": r["batch"], "seq": r["seq"], "ac": r["ac"], "forward_s": f,
                      "backward_s": r["fb_s"] - f, "derived": True})
        if not r["ac"]:
            rates.append(6 * p_layer * r["batch"] * r["seq"] / r["fb_s"])
    rate = sum(rates) / len(rates)  # model FLOP/s of a compiled layer
    hbm = HBM_TBPS["h200"] * 1e12
    head, emb = [], []
    for t in (2048, 4096):
        ce = 5 * 2 * t * vocab / hbm
        head.append({"batch": 1, "seq": t, "forward_s": 2 * p_head * t / rate + ce / 2,
                     "backward_s": 4 * p_head * t / rate + ce / 2})
        emb.append({"batch": 1, "seq": t, "forward_s": 2 * t * h * 2 / hbm, "backward_s": 2 * vocab * h * 2 / hbm})
    p_proj = pc["projector_matmul"]
    projector = [{"image_px": px, "image_tokens": (px // 28) ** 2, "forward_s": 2 * p_proj * (px // 28) ** 2 / rate,
                  "backward_s": 4 * p_proj * (px // 28) ** 2 / rate} for px in (532, 1036)]
    fused = [{"dtype": "bfloat16", "fused": True, "params": n, "step_s": s_param * n} for n in (10**8, 10**9)]
    fused += [{"dtype": "float32", "fused": True, "params": n,
               "step_s": s_param * n * _PROVISIONAL_ASSUMPTIONS["fp32_over_bf16_adamw"]} for n in (10**8, 10**9)]
    fused += [{"dtype": "float32", "fused": False, "params": n,
               "step_s": s_param * n * _PROVISIONAL_ASSUMPTIONS["fp32_over_bf16_adamw"]
               * _PROVISIONAL_ASSUMPTIONS["foreach_over_fused_adamw"]} for n in (10**8, 10**9)]
    table = {
        "schema": 1, "provisional": True,
        "command": "python bench/cost_tables.py --write",
        "sources": ["bench/results/step_speed_h200.json", "bench/results/step_speed_h200_8layers.json",
                    "bench/results/step_speed_h200_final.json", "issue #15 (tower)"],
        "device_name": four.get("device_name", "NVIDIA H200"), "torch": four.get("torch"), "compiled": True,
        "assumptions": _PROVISIONAL_ASSUMPTIONS,
        "tp8_shard_efficiency": _PROVISIONAL_ASSUMPTIONS["tp8_shard_efficiency"],
        "eager_factor": EAGER_TIME_FACTOR,
        "dims": {"hidden": h, "ffn": 28672, "num_heads": 96, "num_kv_heads": 8, "head_dim": 128, "vocab": vocab,
                 "vision_hidden": 1664, "vision_ffn": 8192, "vision_layers": 48, "patch_size": 14, "merge": 2},
        "layer": {"1": layer}, "head": {"1": head}, "tower": _ISSUE15_TOWER, "projector": projector,
        "embeddings": emb, "optimizer": fused, "slice_first": [], "slice_middle": [],
        "adamw_bf16_s_per_param": s_param, "layer_model_flops_per_s": rate,
    }
    # the 4-layer slice's step (final model revision) rebuilt from the table: a check of the derivation
    ct = CostTable(table)
    case = final["cases"][0]
    b, s = case["batch_size"], case["seq_len"]
    mb = MicroBatch(b, s, (case["patches_per_sample"],) * b, case["image_tokens_per_sample"] * b)
    st = stage_time(ct, layers=final["layers"], first=True, last=True, mb=mb)
    rebuilt = st.forward + st.backward + ct.optimizer(case["variants"]["plugin_compile_c1"]["trainable_params"], 2,
                                                      True)
    table["check_4layer_slice"] = {"file": "step_speed_h200_final.json", "case": f"{s}x{b}",
                                   "measured_s": case["variants"]["plugin_compile_c1"]["median_step_s"],
                                   "rebuilt_s": rebuilt}
    return table


def derive_packed_attention(results_dir: str) -> Dict[str, Any]:
    """The cost table's ``packed_attention`` section, from the recorded attention-only packing runs.

    Each ``packing_attention_tp{N}_pb{P}_h200.json`` (``bench/packing.py --attention-only --attention-tp N
    --pack-batch P``) timed one decoder layer's attention forward + backward, at one TP rank's head shapes, over
    the same 18 packs of the MedPix-like mix in micro-batches of P packs (FlexAttention BlockMask and SDPA with the
    dense mask), and over 48 sequences of 2048 tokens with causal SDPA (``pad_max``): per pack and per causal
    sequence. Repeated runs of one shape (``_run1``) are averaged.

    Args:
        results_dir (str): ``bench/results``.

    Returns:
        Dict[str, Any]: ``{"sources": [...], "packed_attention": {tp: [{packs, flex_s_per_pack,
        dense_s_per_pack, causal_s_per_sequence}]}}``.
    """
    runs: Dict[Tuple[int, int], List[Dict[str, float]]] = {}
    sources = []
    for path in sorted(Path(results_dir).glob("packing_attention_tp*_pb*_h200.json")):
        run = json.loads(path.read_text())
        att, lay = run["attention"], run["layouts"]
        packs, seq = lay["packed"]["shape"]
        packed = lay["packed"]["micro_batches"] * packs
        causal = lay["pad_max"]["micro_batches"] * lay["pad_max"]["shape"][0]
        runs.setdefault((int(run["attention_tp"]), packs), []).append({
            "flex_s_per_pack": att["packed_flex_blockmask"]["s"] / packed,
            "dense_s_per_pack": att["packed_sdpa_dense_mask"]["s"] / packed,
            "causal_s_per_sequence": att["pad_max_sdpa_causal"]["s"] / causal,
        })
        sources.append(f"bench/results/{path.name}")
    section: Dict[str, List[Dict[str, float]]] = {}
    for (tp, packs), rows in sorted(runs.items()):
        mean = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
        section.setdefault(str(tp), []).append({"packs": packs, **mean})
    return {"sources": sources, "packed_attention": section}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(RESULTS), help="the recorded runs (default: bench/results)")
    ap.add_argument("--write", action="store_true", help="rewrite the planner's derived tables")
    args = ap.parse_args(argv)
    for path, table in ((PROVISIONAL_FILE, derive_provisional_table(args.results)),
                        (PACKED_ATTENTION_FILE, derive_packed_attention(args.results))):
        text = json.dumps(table, indent=1)
        if args.write:
            path.write_text(text + "\n")
            print(f"wrote {path}")
        else:
            print(f"== {path.name}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
