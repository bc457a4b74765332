"""Time full training steps of the plugin's Mistral 3 model and of transformers' on a width-faithful MM3.5 slice.

One step = forward (frozen Pixtral tower + projector + N decoder layers + head), loss, backward, fused AdamW
step, ``zero_grad(set_to_none=True)``. Both sides train the same parameters (tower frozen; projector,
embeddings, layers and head trained) on the same batch. Prints a table and writes a JSON:

    # on the H200 (see docs/performance.md for the device call)
    python bench/step_speed.py --layers 4 --cases 2048x2,4096x1 --out bench/results/step_speed_h200.json
    # here, to test the script
    PYTHONPATH=plugin python bench/step_speed.py --device cpu --tiny --cases 64x2 --steps 1 --warmup 1

Variants (``--variants``), names made of ``_``-separated switches:
    plugin_eager        plugin model, eager, torchtune chunked CE (``CEWithChunkedOutputLoss``, 8 chunks)
    plugin_compile      + per-layer torch.compile (``training.compile_model``) and compiled CE (``compile_loss``)
    ..._ac              + activation checkpointing of every ``TransformerSelfAttentionLayer``
    ..._cN              N output chunks instead of 8 (``loss.num_output_chunks=N``; ``set_num_output_chunks``)
    ..._optc            AdamW step under torch.compile (foreach, fused by inductor) instead of fused=True
    ..._fullrope        RoPE tables for the config's 262144 positions instead of ``max_seq_len`` = the
                        sequence length (the builder's ``max_seq_len`` override)
    hf_sdpa / hf_eager  transformers ``Mistral3ForConditionalGeneration``, attn_implementation sdpa / eager,
                        its own loss (``labels=``; full fp32 logits)
"""

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _slice import count_params, make_batch, slice_hf_config, step_flops, write_config_dir  # noqa: E402

GIB = 1024**3


def matmul_peak(device: str, n: int = 8192, warmup: int = 5, iters: int = 20) -> float:
    """bf16 ``n x n x n`` matmul rate on random data, TFLOP/s (mean of ``iters`` after ``warmup``)."""
    if device != "cuda":
        return float("nan")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(warmup):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    sec = start.elapsed_time(end) / 1e3 / iters
    return 2 * n**3 / sec / 1e12


# ----------------------------------------------------------------------------------------------- models


def build_hf(cfg: Dict, attn: str, device: str):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")})
    config.tie_word_embeddings = False
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Mistral3ForConditionalGeneration._from_config(config, attn_implementation=attn,
                                                                  dtype=torch.bfloat16)
    finally:
        torch.set_default_dtype(prev)
    model.model.vision_tower.requires_grad_(False)
    model.train()
    return model


def build_plugin(cfg: Dict, device: str, compile_model: bool, ac: bool, max_seq_len: Optional[int]):
    from torchtune import modules, training
    from torchtune_mistral3.checkpointing import mistral3_from_hf_config

    ckpt_dir = write_config_dir(cfg)
    with training.set_default_dtype(torch.bfloat16), torch.device(device):
        model = mistral3_from_hf_config(
            checkpoint_dir=ckpt_dir, vision_trainable=False, projector_trainable=True, embeddings_trainable=True,
            output_trainable=True, **({"max_seq_len": max_seq_len} if max_seq_len else {}),
        )
        # Builders may set RoPE caches lazily (meta-device path); make sure they exist on this device.
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
    _random_init(model)
    if compile_model:
        training.compile_model(model, verbose=False)
    if ac:
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    model.train()
    return model


@torch.no_grad()
def _random_init(model: torch.nn.Module) -> None:
    """Small random weights (norm scales stay 1), so activations stay finite like a real checkpoint's."""
    for p in model.parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.02)


# ----------------------------------------------------------------------------------------------- steps


def plugin_step_fn(model, batch: Dict, compile_loss: bool, chunks: int = 8) -> Callable[[], torch.Tensor]:
    from torchtune import training
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=chunks)
    if compile_loss:
        training.compile_loss(loss_fn, verbose=False)
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    encoder_input = {"image": {"pixel_values": batch["pixel_values"], "image_sizes": batch["image_sizes"],
                               "images_per_sample": batch["images_per_sample"]}}
    labels = batch["labels"]
    # The recipe's shift: position i predicts token i+1.
    shifted = torch.hstack((labels[:, 1:], torch.full_like(labels[:, :1], -100)))

    def forward_loss():
        logits = model(batch["tokens"], encoder_input=encoder_input, mask=None, input_pos=None)
        return loss_fn(logits, shifted)

    return forward_loss


def hf_step_fn(model, batch: Dict) -> Callable[[], torch.Tensor]:
    def forward_loss():
        out = model(input_ids=batch["tokens"], pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
                    labels=batch["labels"], use_cache=False)
        return out.loss

    return forward_loss


def run_variant(name: str, cfg: Dict, batch: Dict, device: str, steps: int, warmup: int, profile: bool) -> Dict:
    """Build the variant's model and optimizer, warm up, time ``steps`` steps; memory and kernel profile."""
    torch._dynamo.reset()
    build_start = time.perf_counter()
    if name.startswith("hf_"):
        model = build_hf(cfg, name[3:], device)
        forward_loss = hf_step_fn(model, batch)
    else:
        switches = name.split("_")[1:]
        compiled = "compile" in switches
        chunks = next((int(w[1:]) for w in switches if re.fullmatch(r"c\d+", w)), 8)
        max_seq_len = None if "fullrope" in switches else batch["tokens"].shape[1]
        model = build_plugin(cfg, device, compile_model=compiled, ac="ac" in switches, max_seq_len=max_seq_len)
        forward_loss = plugin_step_fn(model, batch, compile_loss=compiled, chunks=chunks)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    if "optc" in name.split("_"):
        # torch.compile'd optimizer step: inductor fuses the foreach AdamW into a few kernels. (With an LR
        # scheduler, pass lr as a tensor with capturable=True so that a new lr does not recompile.)
        opt = torch.optim.AdamW(trainable, lr=1e-5, foreach=True)

        @torch.compile(fullgraph=False)
        def opt_step():
            opt.step()
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-5, fused=(device == "cuda"))
        opt_step = opt.step
    res = {
        "variant": name,
        "trainable_params": sum(p.numel() for p in trainable),
        "frozen_params": sum(p.numel() for p in frozen),
        "build_s": round(time.perf_counter() - build_start, 2),
    }
    cuda = device == "cuda"
    mem = {}

    def step(record_memory: bool = False):
        if record_memory and cuda:
            torch.cuda.synchronize()
            mem["before_forward"] = torch.cuda.memory_allocated()
        loss = forward_loss()
        if record_memory and cuda:
            torch.cuda.synchronize()
            mem["after_forward"] = torch.cuda.memory_allocated()
        loss.backward()
        if record_memory and cuda:
            torch.cuda.synchronize()
            mem["after_backward"] = torch.cuda.memory_allocated()
        opt_step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    losses = []
    for _ in range(warmup):
        losses.append(float(step()))
    res["warmup_s"] = round(time.perf_counter() - t0, 2)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            loss = step(record_memory=(i == 0))
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t)
        losses.append(float(loss))
    res["step_s"] = times
    res["median_step_s"] = statistics.median(times)
    res["losses"] = losses
    if cuda:
        res["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        params_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        opt_bytes = sum(
            t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)
        )
        res["memory_gib"] = {
            "params": params_bytes / GIB,
            "optimizer_state": opt_bytes / GIB,
            "before_forward": mem["before_forward"] / GIB,
            "forward_held": (mem["after_forward"] - mem["before_forward"]) / GIB,
            "grads_after_backward": (mem["after_backward"] - mem["before_forward"]) / GIB,
        }
    if profile and cuda:
        res["profile"] = profile_step(step)
    return res  # the model and optimizer are freed with this frame; the caller collects


def profile_step(step: Callable) -> Dict:
    """CUDA kernel time of one step, by kernel: the top 25 and the attention kernels (which SDPA backend ran)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = ev.cuda_time_total
        if t > 0 and ev.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((ev.key, t / 1e3, ev.count))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    attn_words = ("flash", "fmha", "attention", "cudnn", "efficient", "sdpa")
    return {
        "kernel_ms_total": total,
        "top": [{"kernel": k[:160], "ms": round(ms, 3), "calls": c} for k, ms, c in rows[:25]],
        "attention_kernels": [{"kernel": k[:160], "ms": round(ms, 3), "calls": c} for k, ms, c in rows
                              if any(w in k.lower() for w in attn_words)][:12],
        # matmul kernels (cuBLAS nvjet/cutlass/xmma names); cuDNN's attention kernels also carry "sm90"
        "gemm_ms": round(sum(ms for k, ms, _ in rows if any(w in k.lower() for w in ("gemm", "sm90", "cutlass",
                                                                                        "nvjet", "xmma"))
                             and not any(w in k.lower() for w in attn_words)), 3),
    }


# ----------------------------------------------------------------------------------------------- main


def parse_cases(text: str) -> List[tuple]:
    out = []
    for item in text.split(","):
        s, b = item.lower().split("x")
        out.append((int(s), int(b)))
    return out


def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny dims, to test the script on CPU")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the slice")
    ap.add_argument("--cases", default="2048x2,4096x1", help="SEQxBATCH list")
    ap.add_argument("--image-px", type=int, default=532, help="square image side after Pixtral resizing")
    ap.add_argument("--variants", default="plugin_compile,hf_sdpa,plugin_eager,hf_eager,plugin_compile_ac")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="profile one extra step per variant")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    torch._dynamo.config.cache_size_limit = 64
    cfg = slice_hf_config(args.layers, tiny=args.tiny)
    image_px = 56 if args.tiny else args.image_px
    result = {
        "command": "python bench/step_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": platform.node(),
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "layers": args.layers,
        "image_px": image_px,
        "param_counts": count_params(cfg),
        "matmul_peak_tflops_start": matmul_peak(args.device),
        "cases": [],
    }
    print(f"bf16 8192^3 matmul: {result['matmul_peak_tflops_start']:.1f} TFLOP/s", flush=True)
    for seq, bsz in parse_cases(args.cases):
        batch = make_batch(cfg, bsz, seq, image_px, args.device)
        flops = step_flops(cfg, bsz, seq, batch["image_tokens"], batch["patches"])
        case = {"seq_len": seq, "batch_size": bsz, "image_tokens_per_sample": batch["image_tokens"],
                "patches_per_sample": batch["patches"], "flops_per_step": flops, "variants": {}}
        for name in args.variants.split(","):
            try:
                r = run_variant(name, cfg, batch, args.device, args.steps, args.warmup, args.profile)
            except torch.OutOfMemoryError as e:
                r = {"variant": name, "error": f"OOM: {str(e)[:300]}"}
            except Exception as e:  # noqa: BLE001 - a failing variant is reported, the others still run
                traceback.print_exc()
                r = {"variant": name, "error": f"{type(e).__name__}: {str(e)[:500]}"}
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
            if "median_step_s" in r:
                sec = r["median_step_s"]
                r["tokens_per_s"] = bsz * seq / sec
                r["model_tflops"] = flops["total"] / sec / 1e12
                r["mfu_vs_measured_peak"] = r["model_tflops"] / result["matmul_peak_tflops_start"]
            case["variants"][name] = r
            print(_row(seq, bsz, r), flush=True)
            if args.out:
                _write(args.out, result, case)
        ref = case["variants"].get("hf_sdpa", {})
        for r in case["variants"].values():
            if "tokens_per_s" in r and "tokens_per_s" in ref:
                r["speed_vs_hf_sdpa"] = r["tokens_per_s"] / ref["tokens_per_s"]
                if "peak_allocated_gib" in r:
                    r["peak_mem_vs_hf_sdpa"] = r["peak_allocated_gib"] / ref["peak_allocated_gib"]
        result["cases"].append(case)
    result["matmul_peak_tflops_end"] = matmul_peak(args.device)
    print(f"bf16 8192^3 matmul at the end: {result['matmul_peak_tflops_end']:.1f} TFLOP/s")
    print_table(result)
    if args.out:
        _write(args.out, result, None)
    return result


def _write(path: str, result: Dict, partial_case: Optional[Dict]) -> None:
    data = dict(result)
    if partial_case is not None:
        data = dict(result, cases=result["cases"] + [partial_case])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=float)


def _row(seq: int, bsz: int, r: Dict) -> str:
    if "error" in r:
        return f"seq {seq:5d} b{bsz} {r['variant']:18s} {r['error'][:100]}"
    peak = r.get("peak_allocated_gib", float("nan"))
    return (f"seq {seq:5d} b{bsz} {r['variant']:18s} step {r['median_step_s'] * 1e3:8.1f} ms  "
            f"{bsz * seq / r['median_step_s']:9.0f} tok/s  peak {peak:6.1f} GiB  warmup {r['warmup_s']:.0f} s  "
            f"loss {r['losses'][-1]:.3f}")


def print_table(result: Dict) -> None:
    print(f"\n{result['device_name']}  torch {result['torch']}  transformers {result['transformers']}  "
          f"layers {result['layers']}  image {result['image_px']}px  "
          f"matmul peak {result['matmul_peak_tflops_start']:.0f} TFLOP/s")
    print("model FLOPs/step = 6 (N P_layer + P_head) T + 12 N S (n_h d) T  [text, non-causal attention]"
          " + 6 P_proj B i  [projector] + 2 P_vision B p + 4 B p^2 d_v L_v  [frozen tower, forward only]")
    print(f"{'seq x b':>9} {'variant':18s} {'ms/step':>8} {'tok/s':>8} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'peak GiB':>8} {'x hf_sdpa':>9} {'mem x':>6}")
    for case in result["cases"]:
        for name, r in case["variants"].items():
            if "error" in r:
                print(f"{case['seq_len']:>5} x {case['batch_size']} {name:18s} {r['error'][:80]}")
                continue
            print(f"{case['seq_len']:>5} x {case['batch_size']} {name:18s} {r['median_step_s'] * 1e3:8.1f} "
                  f"{r['tokens_per_s']:8.0f} {r['model_tflops']:8.1f} {r['mfu_vs_measured_peak']:6.1%} "
                  f"{r.get('peak_allocated_gib', float('nan')):8.1f} {r.get('speed_vs_hf_sdpa', float('nan')):9.3f} "
                  f"{r.get('peak_mem_vs_hf_sdpa', float('nan')):6.3f}")


if __name__ == "__main__":
    main()
