"""Causal GQA attention at MM3.5 width (96 query / 8 KV heads of 128), forward + backward, two ways:

- ``expand``: keys/values repeated to 96 heads before SDPA (what the plugin's ``Mistral3Attention`` does today);
- ``enable_gqa``: SDPA given the 8 KV heads and ``enable_gqa=True`` (what transformers' sdpa path does).

Prints time, memory kept for backward, the kernels SDPA picked, and the largest output/gradient difference:

    python bench/attention_gqa.py --out bench/results/attention_gqa_h200.json
"""

import argparse
import json
import statistics

import torch
import torch.nn.functional as F


def attend(q, k, v, how: str):
    if how == "expand":
        b, n_kv, s, d = k.shape
        rep = q.shape[1] // n_kv
        k = k.unsqueeze(2).expand(b, n_kv, rep, s, d).flatten(1, 2)
        v = v.unsqueeze(2).expand(b, n_kv, rep, s, d).flatten(1, 2)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def run(b: int, s: int, how: str, inputs, device: str, iters: int = 10) -> dict:
    q, k, v, g = inputs

    def step():
        out = attend(q, k, v, how)
        out.backward(g)
        return out

    for _ in range(3):
        step()
        q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = attend(q, k, v, how)
    held = torch.cuda.memory_allocated() - before
    out.backward(g)
    grads = [t.grad.clone() for t in (q, k, v)]
    q.grad = k.grad = v.grad = None
    times = []
    for _ in range(iters):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        step()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1))
        q.grad = k.grad = v.grad = None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    q.grad = k.grad = v.grad = None
    kernels = sorted({e.key[:90] for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA})
    return {"ms": statistics.median(times), "held_for_backward_mib": held / 2**20, "kernels": kernels,
            "out": out.detach(), "grads": grads}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="2048x2,4096x1")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = "cuda"
    results = []
    for item in args.cases.split(","):
        s, b = (int(x) for x in item.split("x"))
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(b, 96, s, 128, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
        k = torch.randn(b, 8, s, 128, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
        v = torch.randn(b, 8, s, 128, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
        g = torch.randn(b, 96, s, 128, device=device, dtype=torch.bfloat16, generator=gen)
        ra = run(b, s, "expand", (q, k, v, g), device)
        rb = run(b, s, "enable_gqa", (q, k, v, g), device)
        diff_out = (ra["out"].float() - rb["out"].float()).abs().max().item()
        diff_grad = max((x.float() - y.float()).abs().max().item() for x, y in zip(ra["grads"], rb["grads"]))
        row = {"seq_len": s, "batch_size": b, "diff_out": diff_out, "diff_grad": diff_grad}
        for name, r in (("expand", ra), ("enable_gqa", rb)):
            row[name] = {k2: r[k2] for k2 in ("ms", "held_for_backward_mib", "kernels")}
        results.append(row)
        print(f"{s} x {b}: expand {ra['ms']:.2f} ms, {ra['held_for_backward_mib']:.0f} MiB held | enable_gqa "
              f"{rb['ms']:.2f} ms, {rb['held_for_backward_mib']:.0f} MiB held | max diff out {diff_out:.2e} "
              f"grad {diff_grad:.2e}")
        print("   expand kernels:", ra["kernels"])
        print("   gqa kernels:   ", rb["kernels"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "cases": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
