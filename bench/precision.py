"""Step time, peak memory and loss curves of the precision policies on the full-width Mistral Medium 3.5 slice.

    python bench/precision.py --layers 4 --out bench/results/precision_h200.json            # one H200
    python bench/precision.py --layers 8 --variants bf16,mixed,mixed_fp8_tensorwise
    python bench/precision.py --tiny --device cpu --steps 2 --curve-steps 4                  # CPU smoke run

Variants, each built the way the recipe builds it (``training/_precision.py``: FP8 conversion, then per-layer
compile, then FSDP2 on a data-parallel mesh of 1 with the policy's ``MixedPrecisionPolicy``):

- ``bf16``: pure bf16 (``master_dtype: bf16``; torch AdamW, fused on CUDA) -- the peer every ratio is taken against;
- ``mixed``: fp32 master weights and AdamW states, bf16 compute (``master_dtype: fp32``, the shipped default);
- ``sr``: bf16 weights and states, stochastic rounding (``StochasticRoundingAdamW``);
- ``mixed_fp8_tensorwise`` / ``mixed_fp8_rowwise``: ``mixed`` with the decoder linears in torchao float8.

Then the loss curves: ``--curve-steps`` (default 60) AdamW steps at lr 1e-5 of ``bf16`` and of each FP8 variant
from the same initial weights, on a new batch every step (``--curve-data varied``; ``repeated`` reuses one batch,
as the first FP8 benchmark did). The initial weights have the statistics of a trained checkpoint rather than
N(0, 0.02) everywhere: ``--init std`` keeps the step-time benchmark's N(0, 0.02), ``--init scaled`` draws each
linear from N(0, 1/sqrt(fan_in)) and the embeddings from N(0, 1) (what a pretrained model's RMS-normed
residual stream sees; a repeated random batch with 0.02 weights is memorised in a few steps, which makes small
numeric differences look like large loss gaps). Printed: per-step losses side by side, the relative gap of the
mean of the last 10 losses, step-time and peak-memory ratios against ``bf16`` measured in the same run.

Not run on a GPU yet (docs/performance.md): the CPU path (``--tiny``) checks the script; FP8 needs CUDA
capability >= 8.9 and is skipped elsewhere with a note.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _slice import make_batch, slice_hf_config, write_config_dir  # noqa: E402

GIB = 1024**3
VARIANTS = ("bf16", "mixed", "sr", "mixed_fp8_tensorwise", "mixed_fp8_rowwise")


def _policy(name: str):
    from omegaconf import OmegaConf
    from torchtune_mistral3.training import precision_policy

    keys = {"dtype": "bf16", "master_dtype": "bf16" if name in ("bf16", "sr") else "fp32"}
    if name == "sr":
        keys["optimizer"] = {"_component_": "torchtune_mistral3.training.StochasticRoundingAdamW"}
    if "_fp8_" in name:
        keys["fp8_recipe"] = name.rsplit("_", 1)[-1]
    return precision_policy(OmegaConf.create(keys), torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@torch.no_grad()
def _init(model: torch.nn.Module, how: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        std = 0.02 if how == "std" else (1.0 if "tok_embeddings" in name else p.shape[1] ** -0.5)
        p.copy_(torch.randn(p.shape, generator=gen) * std)


def build(name: str, cfg: Dict, device: str, compile_model: bool, init: str, seq_len: int):
    """The variant's model (policy applied as the recipe applies it) and optimizer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torchtune import training
    from torchtune_mistral3.models.mistral3 import mistral3_from_hf_config
    from torchtune_mistral3.training import StochasticRoundingAdamW, convert_to_fp8, shard_model

    policy = _policy(name)
    with training.set_default_dtype(policy.master_dtype), torch.device("cpu"):
        model = mistral3_from_hf_config(
            checkpoint_dir=write_config_dir(cfg),
            vision_trainable=False,
            projector_trainable=True,
            embeddings_trainable=True,
            output_trainable=True,
            max_seq_len=seq_len,
        )
    _init(model, init, seed=0)  # same weights (up to the master dtype's rounding) for every variant
    model.to(device)
    with training.set_default_dtype(policy.compute_dtype), torch.device(device):
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
    if policy.fp8_recipe is not None:
        convert_to_fp8(model, policy.fp8_recipe)
    if compile_model:
        training.compile_model(model, verbose=False)
    if policy.casts_parameters:
        mesh = init_device_mesh(device, (1,), mesh_dim_names=("dp",))
        shard_model(
            model,
            [lambda n, m: n.startswith("decoder.layers.") and n.count(".") == 2],
            cpu_offload=False,
            reshard_after_forward=True,
            dp_mesh=mesh["dp"],
            mp_policy=policy.mp_policy(),
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    if name == "sr":
        opt = StochasticRoundingAdamW(trainable, lr=1e-5, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0, fused=(device == "cuda"))
    model.train()
    return model, opt


def step_fn(model, opt, compile_loss: bool):
    from torchtune import training
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=8)
    if compile_loss:
        training.compile_loss(loss_fn, verbose=False)
    model.set_num_output_chunks(loss_fn.num_output_chunks)

    def step(batch: Dict) -> float:
        encoder_input = {"image": {k: batch[k] for k in ("pixel_values", "image_sizes", "images_per_sample")}}
        labels = batch["labels"]
        shifted = torch.hstack((labels[:, 1:], torch.full_like(labels[:, :1], -100)))
        loss = loss_fn(model(batch["tokens"], encoder_input=encoder_input, mask=None, input_pos=None), shifted)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_variant(name, cfg, batch, args) -> Dict:
    torch._dynamo.reset()
    model, opt = build(name, cfg, args.device, args.compile, args.init, batch["tokens"].shape[1])
    step = step_fn(model, opt, args.compile)
    for _ in range(args.warmup):
        step(batch)
    _sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step(batch)
        _sync(args.device)
        times.append(time.perf_counter() - t)
    res = {"variant": name, "median_step_s": statistics.median(times), "step_s": times}
    if args.device == "cuda":
        res["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
    del model, opt
    return res


def loss_curve(name, cfg, batches: List[Dict], args) -> List[float]:
    torch._dynamo.reset()
    model, opt = build(name, cfg, args.device, args.compile, args.init, batches[0]["tokens"].shape[1])
    step = step_fn(model, opt, args.compile)
    return [step(b) for b in batches]


def _fp8_ok(device: str) -> bool:
    return device == "cuda" and torch.cuda.get_device_capability() >= (8, 9)


def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny dims, to test the script on CPU")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--image-px", type=int, default=532)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--curve-steps", type=int, default=60)
    ap.add_argument("--curve-data", choices=("varied", "repeated"), default="varied")
    ap.add_argument("--init", choices=("scaled", "std"), default="scaled")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        args.seq, args.batch, args.image_px = min(args.seq, 128), 1, 56
        args.compile = args.compile and args.device == "cuda"
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if args.device == "cuda" else "gloo",
            rank=0,
            world_size=1,
            init_method=f"file://{tempfile.mkdtemp()}/pg",
        )
    cfg = slice_hf_config(args.layers, tiny=args.tiny)
    variants = [v for v in args.variants.split(",") if v]
    skipped = [v for v in variants if "_fp8_" in v and not _fp8_ok(args.device)]
    variants = [v for v in variants if v not in skipped]
    for v in skipped:
        print(f"skipping {v}: FP8 needs CUDA capability >= 8.9 ({args.device} here)")
    if "bf16" not in variants:
        variants.insert(0, "bf16")

    batch = make_batch(cfg, args.batch, args.seq, args.image_px, args.device)
    result = {"args": vars(args), "skipped": skipped, "timing": [], "curves": {}}
    for v in variants:
        result["timing"].append(time_variant(v, cfg, batch, args))
        print(json.dumps(result["timing"][-1]))
    peer = result["timing"][0]
    for r in result["timing"]:
        r["step_time_vs_bf16"] = r["median_step_s"] / peer["median_step_s"]
        r["speed_vs_bf16"] = peer["median_step_s"] / r["median_step_s"]
        if "peak_allocated_gib" in r:
            r["peak_memory_vs_bf16"] = r["peak_allocated_gib"] / peer["peak_allocated_gib"]

    seeds = range(args.curve_steps) if args.curve_data == "varied" else [0] * args.curve_steps
    batches = [make_batch(cfg, args.batch, args.seq, args.image_px, args.device, seed=s) for s in seeds]
    curve_variants = ["bf16", "mixed"] + [v for v in variants if "_fp8_" in v]
    for v in dict.fromkeys(curve_variants):
        result["curves"][v] = loss_curve(v, cfg, batches, args)
    tail = min(10, args.curve_steps)
    ref = statistics.fmean(result["curves"]["bf16"][-tail:])
    result["curve_gap_vs_bf16"] = {
        v: statistics.fmean(c[-tail:]) / ref - 1 for v, c in result["curves"].items() if v != "bf16"
    }

    print(f"{'variant':<22} {'step s':>8} {'speed x':>8} {'peak GiB':>9} {'mem x':>6}")
    for r in result["timing"]:
        print(
            f"{r['variant']:<22} {r['median_step_s']:8.3f} {r['speed_vs_bf16']:8.3f} "
            f"{r.get('peak_allocated_gib', float('nan')):9.2f} {r.get('peak_memory_vs_bf16', float('nan')):6.3f}"
        )
    names = list(result["curves"])
    print("step " + " ".join(f"{n:>20}" for n in names))
    for i in range(args.curve_steps):
        print(f"{i + 1:>4} " + " ".join(f"{result['curves'][n][i]:20.4f}" for n in names))
    print(
        "mean of the last",
        tail,
        "losses vs bf16:",
        ", ".join(f"{v} {g:+.3%}" for v, g in result["curve_gap_vs_bf16"].items()),
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
