"""One decoder layer at a TP rank's shard shape on packed micro-batches: FlexAttention, SDPA + dense mask, causal.

What the step planner charges a packed micro-batch (``planning/packed_attention_h200.json``, derived from the
attention-only runs of ``bench/packing.py``) is checked here inside a whole layer, compiled as the recipe compiles
it: the layer's forward + backward on each micro-batch of the MedPix-like mix packed ``P`` packs per micro-batch,
with the block-causal mask as a FlexAttention ``BlockMask`` and as the dense boolean mask (the kernel the recipe
picks when flex's backward would have few programs), against the planner's prediction for each. The same layer on
unpacked ``[P, 2048]`` causal batches is the reference the planner's layer entries measured. Also recorded: the
memory one micro-batch's forward keeps for the backward, and the attention kernels the dense-mask path runs (from
the profiler), since SDPA falls back to its math path (which keeps the ``s x s`` weights) when no fused kernel
takes the mask. ``--fp8 tensorwise`` also times the same shard layer with its linears in FP8 (torchao, as
``fp8_recipe`` converts them) on the unpacked causal batches: the FP8 gain at the shard's shapes.

    python bench/packed_layer.py --tp 8 --packs 1,2,3 --fp8 tensorwise --out bench/results/packed_layer_tp8_h200.json
    python bench/packed_layer.py --tiny --device cpu    # the script itself, on the CPU (no flex backward there)
"""

import argparse
import json
import os
import platform
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _slice import slice_hf_config, write_result  # noqa: E402
from packing import layouts, synthetic_mix  # noqa: E402
from step_costs import Timer, _real_layers, _stage, tp_shard_config  # noqa: E402


def _inputs(batch: Dict, device: str, variant: str) -> Dict:
    """The layer's keyword inputs for one micro-batch: the mask of ``variant`` and the packed positions."""
    from torchtune_mistral3.models.mistral3 import block_causal_mask

    if variant == "causal":
        return {"mask": None, "input_pos": None}
    ids = batch["document_ids"].to(device)
    return {"mask": block_causal_mask(ids, flex=variant == "flex"), "input_pos": batch["input_pos"].to(device)}


def time_variant(timer: Timer, layer, batches: List[Dict], h: int, device: str, variant: str) -> Dict:
    """Median forward + backward seconds per micro-batch over the mix, and the memory a forward keeps."""
    shape = tuple(batches[0]["tokens"].shape)
    xs = [torch.randn(*shape, h, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in batches]
    kw = [_inputs(b, device, variant) for b in batches]
    g = torch.randn(*shape, h, device=device, dtype=torch.bfloat16) * 1e-3

    def step(mark):
        for x, k in zip(xs, kw):
            layer(x, encoder_input=None, encoder_mask=None, **k).backward(g)
        mark()

    total = timer.phases(step, 1)[0]
    held = None
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = layer(xs[0], encoder_input=None, encoder_mask=None, **kw[0])
        held = (torch.cuda.memory_allocated() - before) / 2**20
        out.backward(g)
        del out
    return {"s_per_microbatch": total / len(batches), "held_for_backward_mib": held}


def attention_kernels(layer, batch: Dict, h: int, device: str, variant: str) -> List[str]:
    """Names of the attention-looking GPU kernels of one forward + backward (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(*batch["tokens"].shape, h, device=device, dtype=torch.bfloat16, requires_grad=True)
    kw = _inputs(batch, device, variant)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        layer(x, encoder_input=None, encoder_mask=None, **kw).sum().backward()
        torch.cuda.synchronize()
    keys = ("fmha", "flash", "attention", "attn", "softmax", "efficient", "flex", "bmm")
    names = {e.key for e in prof.key_averages() if any(k in e.key.lower() for k in keys)}
    return sorted(names)[:20]


def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny dims, to test the script on CPU")
    ap.add_argument("--tp", type=int, default=8, help="the TP degree whose rank shard is timed")
    ap.add_argument("--packs", default="1,2,3", help="packs per micro-batch to time")
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode instead of the recipe's default (e.g. max-autotune-no-cudagraphs)")
    ap.add_argument("--variants", default=None, help="comma list of causal,dense,flex (default: all the device has)")
    ap.add_argument("--fp8", default=None, help="also time the layer with FP8 linears (tensorwise or rowwise)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from torchtune_mistral3.planning._step_plan import CostTable

    t0 = time.perf_counter()
    device, compiled = args.device, not args.no_compile
    tp = 2 if args.tiny else args.tp
    seq = 128 if args.tiny else 2048
    cfg = tp_shard_config(slice_hf_config(3, tiny=args.tiny), tp)
    t = cfg["text_config"]
    h = t["hidden_size"]
    if args.compile_mode:  # the layer compiled with this mode (the recipe compiles with torch's default)
        layer = _real_layers(_stage(cfg, [1, 1, 1], 1, device, False, seq))[0]
        layer.compile(mode=args.compile_mode, dynamic=False)
    else:
        layer = _real_layers(_stage(cfg, [1, 1, 1], 1, device, compiled, seq))[0]
    fp8_layer = None
    if args.fp8:  # the recipe's order: FP8 swap, then compile
        from torchtune import training
        from torchtune_mistral3.training._precision import convert_to_fp8

        stage = _stage(cfg, [1, 1, 1], 1, device, False, seq)
        convert_to_fp8(stage, args.fp8)
        if compiled:
            training.compile_model(stage, verbose=False)
        fp8_layer = _real_layers(stage)[0]
    mix = synthetic_mix(args.samples, t["vocab_size"], args.tiny)
    timer = Timer(device, args.warmup, args.iters)
    table = CostTable.load()
    kv = t["num_key_value_heads"]
    variants = ["causal", "dense"] + (["flex"] if device == "cuda" else [])  # no flex backward on the CPU
    if args.variants:
        variants = [v for v in args.variants.split(",") if v in variants]
    result = {
        "command": "python bench/packed_layer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": platform.node(), "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "tiny": args.tiny, "compiled": compiled, "tp": tp, "seq": seq,
        "kv_heads_per_rank": kv, "cases": [],
    }
    if args.compile_mode:
        result["compile_mode"] = args.compile_mode
    for packs in [int(p) for p in args.packs.split(",")]:
        cases = layouts(mix, seq, packs, packs)
        packed, causal = cases["packed"], cases["pad_max"]
        case = {"packs": packs, "micro_batches": len(packed)}
        for variant in variants:
            batches = causal[: len(packed)] if variant == "causal" else packed
            case[variant] = time_variant(timer, layer, batches, h, device, variant)
            print(f"tp{tp} {packs} pack(s) {variant:6s} {case[variant]['s_per_microbatch'] * 1e3:.2f} ms/mb, "
                  f"held {case[variant]['held_for_backward_mib']} MiB", flush=True)
        if fp8_layer is not None:
            case["causal_fp8"] = time_variant(timer, fp8_layer, causal[: len(packed)], h, device, "causal")
            case["fp8_speedup"] = case["causal"]["s_per_microbatch"] / case["causal_fp8"]["s_per_microbatch"]
            print(f"tp{tp} {packs} x {seq} causal, FP8 {args.fp8}: {case['fp8_speedup']:.3f}x bf16", flush=True)
        f, b = table.layer(args.tp, packs, 2048, ac=False, compiled=compiled)  # the planner, at full width
        pred = {"causal": f + b}
        for variant in ("dense", "flex"):
            kind = "flex_s_per_pack" if variant == "flex" else "dense_s_per_pack"
            rows = {r["packs"]: r for r in table.data.get("packed_attention", {}).get(str(args.tp), [])}
            if packs in rows:
                pred[variant] = f + b + (rows[packs][kind] - rows[packs]["causal_s_per_sequence"]) * packs
        case["planner_s"] = pred
        if not args.tiny:
            case["planner_error"] = {v: pred[v] / case[v]["s_per_microbatch"] - 1 for v in pred if v in case}
        if device == "cuda" and "dense" in case:
            case["dense_kernels"] = attention_kernels(layer, packed[0], h, device, "dense")
        result["cases"].append(case)
    result["total_s"] = time.perf_counter() - t0
    print(json.dumps({c["packs"]: c.get("planner_error") for c in result["cases"]}), flush=True)
    if args.out:
        write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
