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
from _slice import make_batch, slice_hf_config, write_config_dir, write_result  # noqa: E402

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
    """Draw every matrix in fp32 from a generator on the parameters' device, parameter by parameter in a fixed
    order, so that every variant starts from the same weights (up to its master dtype's rounding)."""
    for i, (name, p) in enumerate(model.named_parameters()):
        if p.dim() < 2:
            continue
        gen = torch.Generator(device=p.device).manual_seed(seed * 100003 + i)
        std = 0.02 if how == "std" else (1.0 if "tok_embeddings" in name else p.shape[1] ** -0.5)
        p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32) * std)


def build(
    name: str,
    cfg: Dict,
    device: str,
    compile_model: bool,
    init: str,
    seq_len: int,
    train_embeddings: bool,
    lr: float = 1e-5,
):
    """The variant's model (policy applied as the recipe applies it, built on ``device``) and optimizer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torchtune import training
    from torchtune_mistral3.checkpointing import mistral3_from_hf_config
    from torchtune_mistral3.training import StochasticRoundingAdamW, convert_to_fp8, shard_model

    policy = _policy(name)
    with training.set_default_dtype(policy.master_dtype), torch.device(device):
        model = mistral3_from_hf_config(
            checkpoint_dir=write_config_dir(cfg),
            vision_trainable=False,
            projector_trainable=True,
            embeddings_trainable=train_embeddings,
            output_trainable=train_embeddings,
            max_seq_len=seq_len,
        )
    policy.store_frozen_in_compute_dtype(model)  # as the recipe does (the 2026-12-02 H200 runs predate this)
    _init(model, init, seed=0)  # same weights (up to the master dtype's rounding) for every variant
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
        opt = StochasticRoundingAdamW(trainable, lr=lr, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, fused=(device == "cuda"))
    model.train()
    return model, opt


def step_fn(model, opt, compile_loss: bool):
    from torchtune import training
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=8)
    if compile_loss:
        training.compile_loss(loss_fn, verbose=False)
    model.set_num_output_chunks(loss_fn.num_output_chunks)

    def step(batch: Dict, update: bool = True) -> float:
        encoder_input = {"image": {k: batch[k] for k in ("pixel_values", "image_sizes", "images_per_sample")}}
        labels = batch["labels"]
        shifted = torch.hstack((labels[:, 1:], torch.full_like(labels[:, :1], -100)))
        loss = loss_fn(model(batch["tokens"], encoder_input=encoder_input, mask=None, input_pos=None), shifted)
        loss.backward()
        if update:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_variant(name, cfg, batch, args) -> Dict:
    _release(args.device)
    try:
        model, opt = build(name, cfg, args.device, args.compile, args.init, batch["tokens"].shape[1],
                           args.train_embeddings)
        return _time_built(name, model, opt, batch, args)
    except torch.OutOfMemoryError as e:  # recorded, not fatal: the other variants still run
        print(f"{name}: out of memory ({str(e).splitlines()[0]})")
        return {"variant": name, "error": "out of memory"}
    finally:
        model = opt = None
        if args.device == "cuda":
            torch.cuda.empty_cache()


def _time_built(name, model, opt, batch, args) -> Dict:
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
    # The same step in its two parts: forward + backward of the batch, then the optimizer step alone. A real
    # step accumulates many micro-batches per optimizer step (64 samples of 2048 tokens at the peer's global
    # batch), so the optimizer's share, which the fp32 master weights make larger, shrinks with accumulation.
    fwd_bwd, optim = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        step(batch, update=False)
        _sync(args.device)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(args.device)
        fwd_bwd.append(t1 - t)
        optim.append(time.perf_counter() - t1)
    res["median_fwd_bwd_s"] = statistics.median(fwd_bwd)
    res["median_optimizer_s"] = statistics.median(optim)
    res["accum"] = args.accum
    res["step_s_at_accum"] = args.accum * res["median_fwd_bwd_s"] + res["median_optimizer_s"]
    del model, opt
    return res


def loss_curve(name, cfg, batches: List[Dict], args) -> List[float]:
    _release(args.device)
    model, opt = build(name, cfg, args.device, args.compile, args.init, batches[0]["tokens"].shape[1],
                       args.train_embeddings, lr=args.curve_lr)
    step = step_fn(model, opt, args.compile)
    losses = [step(b) for b in batches]
    del model, opt
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return losses


def _grad_kind(name: str) -> str:
    for kind in ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3"):
        if f".{kind}." in name:
            return kind
    return "other"


def _release(device: str) -> None:
    """Drop compiled graphs and free the memory of the models built before."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def grad_agreement(name: str, cfg, batch: Dict, args) -> Dict:
    """How far the FP8 variant's first-step weight gradients of the decoder linears are from ``mixed``'s.

    Both start from the same weights and see the same batch (eager, no optimizer step). Per linear kind: the
    cosine of the two gradients and the relative error ``|g_fp8 - g| / |g|``, summed over layers; plus both
    first losses. A low cosine means FP8's quantised gradients point elsewhere than bf16's.
    """
    grads, losses = {}, {}
    for v in ("mixed", name):
        _release(args.device)
        model, opt = build(v, cfg, args.device, False, args.init, batch["tokens"].shape[1], args.train_embeddings)
        loss_fn_step = step_fn(model, _NoStep(), False)
        losses[v] = loss_fn_step(batch)
        grads[v] = {
            n: p.grad.detach().float().clone()
            for n, p in model.named_parameters()
            if p.grad is not None and n.startswith("decoder.layers.") and p.dim() == 2
        }
        del model, opt, loss_fn_step
    _release(args.device)
    out = {"first_loss": losses}
    for kind in ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3"):
        dot = ref2 = q2 = err2 = 0.0
        for n, g in grads["mixed"].items():
            if _grad_kind(n) != kind:
                continue
            h = _full(grads[name][n])
            g = _full(g)
            dot += float((g * h).sum())
            ref2 += float((g * g).sum())
            q2 += float((h * h).sum())
            err2 += float(((h - g) ** 2).sum())
        if ref2:
            out[kind] = {"cosine": dot / (ref2 * q2) ** 0.5, "rel_error": (err2 / ref2) ** 0.5}
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class _NoStep:
    """Optimizer stand-in for :func:`grad_agreement`: keeps the gradients."""

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def zipf_answers(batch: Dict, cfg: Dict, seed: int, support: int = 4096, exponent: float = 1.1) -> Dict:
    """``batch`` with its answer tokens redrawn from one fixed Zipf distribution (learnable, never repeated).

    Uniform random answers (``varied``) hold nothing to learn but the flat unigram, so every policy's curve stays
    near ``ln(vocab)``; the same batch every step (``repeated``) is memorised. Here every step's answers are new
    draws from one Zipf law (``p_k ~ 1 / (k + 1) ** exponent`` over ``support`` token ids, mapped through a fixed
    random permutation of the vocabulary above 100), as natural text's unigram is: the loss falls by several nats
    towards the law's entropy, and the models learn it through the trained decoder layers.
    """
    vocab = cfg["text_config"]["vocab_size"]
    support = min(support, vocab - 100)
    ids = torch.randperm(vocab - 100, generator=torch.Generator().manual_seed(1234))[:support] + 100
    probs = 1.0 / torch.arange(1, support + 1, dtype=torch.float64) ** exponent
    answer = batch["labels"] != -100
    draws = torch.multinomial(probs, int(answer.sum()), replacement=True, generator=torch.Generator().manual_seed(seed))
    out = dict(batch)
    out["tokens"], out["labels"] = batch["tokens"].clone(), batch["labels"].clone()
    values = ids[draws].to(batch["tokens"].device)
    out["tokens"][answer] = values
    out["labels"][answer] = values
    return out


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
    ap.add_argument("--accum", type=int, default=32,
                    help="micro-batches per optimizer step for the projected step time (32 x 2 x 2048 = 64 samples)")
    ap.add_argument("--curve-steps", type=int, default=60)
    ap.add_argument("--curve-lr", type=float, default=1e-5, help="AdamW learning rate of the loss curves")
    ap.add_argument("--curve-data", choices=("varied", "repeated", "zipf"), default="varied")
    ap.add_argument("--init", choices=("scaled", "std"), default="scaled")
    ap.add_argument("--train-embeddings", action="store_true",
                    help="train the embeddings and head too (at full width with 4 layers the fp32-master variants "
                    "then need more than one H200; by default they are frozen, as on a middle pipeline stage)")
    ap.add_argument("--curve-variants", default=None, help="default: bf16, mixed and every FP8 variant timed")
    ap.add_argument("--grad-check", action="store_true",
                    help="first-step gradient agreement of each FP8 variant with mixed (see grad_agreement)")
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
    result = {"args": vars(args), "skipped": skipped, "timing": [], "curves": {}, "torch": torch.__version__}
    if args.device == "cuda":
        result["device_name"] = torch.cuda.get_device_name()
    for v in variants:
        result["timing"].append(time_variant(v, cfg, batch, args))
        print(json.dumps(result["timing"][-1]))
    write_result(result, args.out)
    peer = result["timing"][0]
    for r in result["timing"]:
        if "error" in r or "error" in peer:
            continue
        r["fwd_bwd_speed_vs_bf16"] = peer["median_fwd_bwd_s"] / r["median_fwd_bwd_s"]
        r["speed_at_accum_vs_bf16"] = peer["step_s_at_accum"] / r["step_s_at_accum"]
        r["step_time_vs_bf16"] = r["median_step_s"] / peer["median_step_s"]
        r["speed_vs_bf16"] = peer["median_step_s"] / r["median_step_s"]
        if "peak_allocated_gib" in r:
            r["peak_memory_vs_bf16"] = r["peak_allocated_gib"] / peer["peak_allocated_gib"]

    seeds = [0] * args.curve_steps if args.curve_data == "repeated" else range(args.curve_steps)
    batches = [make_batch(cfg, args.batch, args.seq, args.image_px, args.device, seed=s) for s in seeds]
    if args.curve_data == "zipf":
        batches = [zipf_answers(b, cfg, seed=s) for b, s in zip(batches, seeds)]
    if args.curve_variants is not None:
        curve_variants = ["bf16"] + [v for v in args.curve_variants.split(",") if v]
    else:
        curve_variants = ["bf16", "mixed"] + [v for v in variants if "_fp8_" in v]
    curve_variants = [v for v in curve_variants if not ("_fp8_" in v and not _fp8_ok(args.device))]
    for v in dict.fromkeys(curve_variants if args.curve_steps else []):
        result["curves"][v] = loss_curve(v, cfg, batches, args)
    tail = min(10, args.curve_steps)
    if result["curves"]:
        ref = statistics.fmean(result["curves"]["bf16"][-tail:])
        result["curve_gap_vs_bf16"] = {
            v: statistics.fmean(c[-tail:]) / ref - 1 for v, c in result["curves"].items() if v != "bf16"
        }
        result["curve_max_step_gap_vs_bf16"] = {
            v: max(abs(a / b - 1) for a, b in zip(c, result["curves"]["bf16"]))
            for v, c in result["curves"].items()
            if v != "bf16"
        }
    write_result(result, args.out)
    if args.grad_check:
        result["grad_agreement"] = {
            v: grad_agreement(v, cfg, batches[0] if batches else batch, args) for v in variants if "_fp8_" in v
        }
        print(json.dumps(result["grad_agreement"], indent=1))

    print(f"{'variant':<22} {'step s':>8} {'speed x':>8} {'peak GiB':>9} {'mem x':>6} {'fwd+bwd s':>10} "
          f"{'optim s':>8} {'fb x':>6} {'accum x':>8}")
    for r in result["timing"]:
        if "error" in r:
            print(f"{r['variant']:<22} {r['error']}")
            continue
        print(
            f"{r['variant']:<22} {r['median_step_s']:8.3f} {r['speed_vs_bf16']:8.3f} "
            f"{r.get('peak_allocated_gib', float('nan')):9.2f} {r.get('peak_memory_vs_bf16', float('nan')):6.3f} "
            f"{r['median_fwd_bwd_s']:10.3f} {r['median_optimizer_s']:8.3f} {r['fwd_bwd_speed_vs_bf16']:6.3f} "
            f"{r['speed_at_accum_vs_bf16']:8.3f}"
        )
    names = list(result["curves"])
    print("step " + " ".join(f"{n:>20}" for n in names))
    for i in range(args.curve_steps if names else 0):
        print(f"{i + 1:>4} " + " ".join(f"{result['curves'][n][i]:20.4f}" for n in names))
    if names:
        print(
            "mean of the last",
            tail,
            "losses vs bf16:",
            ", ".join(f"{v} {g:+.3%}" for v, g in result["curve_gap_vs_bf16"].items()),
            "| largest per-step gap:",
            ", ".join(f"{v} {g:.3%}" for v, g in result["curve_max_step_gap_vs_bf16"].items()),
        )
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
