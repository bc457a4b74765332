"""Where a step's time goes, from a torch profiler trace (what ``profiler.enabled=True`` of a recipe writes).

    python bench/trace_summary.py <output_dir>/profiling_outputs/iteration_N/*.pt.trace.json.gz [--top 25]

For each profiled step (the ``ProfilerStep#N`` ranges): its wall time, the time the GPU was busy (the union of its
kernel and copy intervals), the idle share, and the longest host waits on the GPU (``cudaStreamSynchronize``,
``cudaDeviceSynchronize``, ``cudaMemcpy*`` calls over 1 ms: where the host blocked the launch queue). Then the GPU
time of the profiled steps by kernel class (matmul, attention, communication, copies and casts, Triton-fused,
other) and the top kernels. A step that is mostly idle GPU time is host-bound (Python, launch, syncs, data); one
that is busy is as fast as its kernels.
"""

import argparse
import gzip
import json
import re
from collections import defaultdict
from typing import Dict, List, Tuple

CLASSES = (
    ("communication", re.compile(r"nccl|all_?gather|reduce_?scatter|all_?reduce", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|varlen", re.I)),
    ("matmul", re.compile(r"gemm|sm90_xmma|cutlass|cublas|nvjet|matmul|_mm_", re.I)),
    ("copy/cast", re.compile(r"memcpy|memset|copy|cast|to_copy|CatArrayBatched|fill", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("triton fused", re.compile(r"^triton_", re.I)),
)
SYNCS = re.compile(r"cudaStreamSynchronize|cudaDeviceSynchronize|cudaMemcpy(Async)?$|cudaEventSynchronize")


def kernel_class(name: str) -> str:
    """The class of a GPU kernel name (first matching pattern of ``CLASSES``, else "other")."""
    for cls, pattern in CLASSES:
        if pattern.search(name):
            return cls
    return "other"


def busy_time(intervals: List[Tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarize(events: List[Dict]) -> Dict:
    """Per-step wall, GPU-busy and host-wait figures and GPU time by kernel class (microseconds)."""
    steps = [e for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("ProfilerStep#")]
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    runtime = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"]
    out = {"steps": [], "classes": defaultdict(float), "kernels": defaultdict(lambda: [0.0, 0])}
    for step in sorted(steps, key=lambda e: e["ts"]):
        t0, t1 = step["ts"], step["ts"] + step["dur"]
        inside = [(max(e["ts"], t0), min(e["ts"] + e["dur"], t1))
                  for e in gpu if e["ts"] < t1 and e["ts"] + e["dur"] > t0]
        waits = sorted((e["dur"], e["name"]) for e in runtime
                       if t0 <= e["ts"] < t1 and SYNCS.search(e["name"]) and e["dur"] > 1000)
        out["steps"].append({"name": step["name"], "wall_us": step["dur"], "gpu_busy_us": busy_time(inside),
                             "host_waits": waits[::-1][:8], "host_wait_us": sum(w for w, _ in waits)})
        for e in gpu:
            if t0 <= e["ts"] < t1:
                out["classes"][kernel_class(e["name"])] += e["dur"]
                k = out["kernels"][e["name"][:110]]
                k[0] += e["dur"]
                k[1] += 1
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="+", help="*.pt.trace.json(.gz) files")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    for path in args.traces:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt") as f:
            events = json.load(f)["traceEvents"]
        s = summarize(events)
        print(f"== {path}")
        for st in s["steps"]:
            idle = 1 - st["gpu_busy_us"] / st["wall_us"]
            print(f"{st['name']}: wall {st['wall_us'] / 1e3:.1f} ms, GPU busy {st['gpu_busy_us'] / 1e3:.1f} ms "
                  f"(idle {idle:.0%}), host waits over 1 ms: {st['host_wait_us'] / 1e3:.1f} ms "
                  + ", ".join(f"{n} {d / 1e3:.1f}" for d, n in st["host_waits"]))
        total = sum(s["classes"].values())
        print("GPU time by class: " + ", ".join(f"{c} {t / 1e3:.1f} ms ({t / total:.0%})"
                                                for c, t in sorted(s["classes"].items(), key=lambda x: -x[1])))
        for name, (t, n) in sorted(s["kernels"].items(), key=lambda x: -x[1][0])[: args.top]:
            print(f"  {t / 1e3:9.1f} ms {n:6d}x  {kernel_class(name):13s} {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
