"""Measure the step-time planner's cost table on one GPU at full Mistral Medium 3.5 width, plus whole-stage slices.

What the planner (``torchtune_mistral3.planning._step_plan``) adds up, each part built as the recipe builds it
(model on the meta device, pipeline stage cut by ``cut_pipeline_stage``, per-layer ``training.compile_model``,
then activation checkpointing, ``to_empty`` on the GPU, ``rope_init``; bf16 weights, compiled chunked CE with one
chunk), timed with CUDA events (median of ``--iters`` after ``--warmup``):

- ``tower``: the frozen 48-layer Pixtral tower's forward, one square image of each ``--image-px`` side, and a
  mixed batch of all of them (one sequence, block attention per image, as the model runs it);
- ``projector``: forward and backward (trained) on the features of one image per size;
- ``embeddings``: token-embedding forward and backward (trained, dense gradient) per token shape;
- ``layer``: one decoder layer's forward and backward, with and without activation checkpointing, per token shape
  (``--shapes``, BxS), at TP1 and at the TP8 shard shape (``layer_tp8``: 12 query heads, 1 KV head, FFN 3584 on
  hidden 12288, i.e. what one rank of 8 computes; the all-reduces between the shards are not run here, the
  planner adds them from byte counts);
- ``head``: final norm + output head + compiled cross-entropy, forward and backward, full vocabulary (TP1) and
  the TP8 shard (16384 of the vocabulary; loss parallel's small reductions not run);
- ``optimizer``: one AdamW step per parameter (fused bf16, fused fp32, foreach fp32) at two sizes;
- ``slice_first``: pipeline stage 0 (embeddings + tower + projector + ``--first-layers`` decoder layers) on a
  MedPix-like micro-batch, forward and backward from a random output gradient, for each ``--first-cases``;
- ``slice_middle``: a middle stage (``--middle-layers`` decoder layers), with and without checkpointing.

    # on one H200 (about 2-3 minutes; stops measuring at --budget-s and says what it skipped)
    PYTHONPATH=plugin python bench/step_costs.py --out plugin/torchtune_mistral3/planning/step_costs_h200.json
    # here, to test the script
    PYTHONPATH=plugin python bench/step_costs.py --tiny --device cpu --iters 1 --warmup 1 --out /tmp/c.json

The ratio printed against a peer measured in the same run: each slice's measured time over the sum of its
measured parts (what the planner predicts from the table).
"""

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _slice import IMG, make_batch, slice_hf_config, write_config_dir  # noqa: E402

SCHEMA = 1


class Timer:
    """Times callables on the device: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: str, warmup: int, iters: int):
        self.cuda = device == "cuda"
        self.warmup, self.iters = warmup, iters

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _elapsed(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b) / 1e3
        return b - a

    def phases(self, step: Callable[[Callable[[], None]], None], n_phases: int) -> List[float]:
        """Median seconds of each phase of ``step(mark)``; ``step`` calls ``mark()`` after each phase."""
        for _ in range(self.warmup):
            step(lambda: None)
        samples = []
        for _ in range(self.iters):
            marks = [self._now()]
            step(lambda marks=marks: marks.append(self._now()))
            if self.cuda:
                torch.cuda.synchronize()
            if len(marks) != n_phases + 1:
                raise RuntimeError(f"step marked {len(marks) - 1} phases, expected {n_phases}")
            samples.append([self._elapsed(a, b) for a, b in zip(marks, marks[1:])])
        return [statistics.median(s[i] for s in samples) for i in range(n_phases)]


# ----------------------------------------------------------------------------------------------- building


def _meta_model(cfg: Dict, max_seq_len: int):
    from torchtune import training
    from torchtune_mistral3.checkpointing import mistral3_from_hf_config

    with training.set_default_dtype(torch.bfloat16), torch.device("meta"):
        return mistral3_from_hf_config(
            checkpoint_dir=write_config_dir(cfg), vision_trainable=False, projector_trainable=True,
            embeddings_trainable=True, output_trainable=True, max_seq_len=max_seq_len,
        )


def _materialise(part: torch.nn.Module, device: str, compile_model: bool) -> torch.nn.Module:
    """The recipe's order for one part: compile per layer -> to_empty -> rope_init -> (here) random weights."""
    from torchtune import training

    if compile_model:
        training.compile_model(part, verbose=False)
    part.to_empty(device=device)
    with training.set_default_dtype(torch.bfloat16), torch.device(device):
        for m in part.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
    with torch.no_grad():
        for name, p in part.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            elif "scale" in name or "weight" in name:
                p.fill_(1.0)
    part.train()
    return part


def _checkpoint_layers(part: torch.nn.Module) -> None:
    from torchtune import modules, training

    training.set_activation_checkpointing(part, auto_wrap_policy={modules.TransformerSelfAttentionLayer})


def _stage(cfg: Dict, split: Sequence[int], stage_id: int, device: str, compile_model: bool, max_seq_len: int):
    from torchtune_mistral3.training import cut_pipeline_stage

    model = _meta_model(cfg, max_seq_len)
    return _materialise(cut_pipeline_stage(model, stage_id, list(split)), device, compile_model)


def _real_layers(stage: torch.nn.Module) -> List[torch.nn.Module]:
    from torchtune_mistral3.training import is_stage_stand_in

    return [m for m in stage.decoder.layers if not is_stage_stand_in(m)]


def _grad_like(t: torch.Tensor) -> torch.Tensor:
    return torch.randn_like(t) * 1e-3


# ----------------------------------------------------------------------------------------------- parts


def time_layer(timer: Timer, layer: torch.nn.Module, b: int, s: int, h: int, device: str) -> Dict[str, float]:
    """Forward and backward of one decoder layer on ``[b, s, h]`` hidden states that require grad."""
    x = torch.randn(b, s, h, device=device, dtype=torch.bfloat16, requires_grad=True)
    g = _grad_like(x)

    def step(mark):
        out = layer(x, mask=None, encoder_input=None, encoder_mask=None, input_pos=None)
        mark()
        out.backward(g)
        mark()

    f, bwd = timer.phases(step, 2)
    return {"forward_s": f, "backward_s": bwd}


def time_stage_layers(timer: Timer, stage: torch.nn.Module, b: int, s: int, h: int, device: str) -> float:
    """Forward and backward of a middle stage through its own forward (``decoder(h)``), per micro-batch."""
    x = torch.randn(b, s, h, device=device, dtype=torch.bfloat16, requires_grad=True)
    g = _grad_like(x)

    def step(mark):
        out = stage(x)
        out.backward(g)
        mark()

    return timer.phases(step, 1)[0]


def time_tower(timer: Timer, vision: torch.nn.Module, sizes: Sequence[int], device: str) -> Dict[str, float]:
    """Forward seconds of the frozen tower on a batch of square images of ``sizes`` px (zero-padded)."""
    from torchtune_mistral3.models.mistral3._vision_encoder import patch_grid_sizes

    side = max(sizes)
    pixels = torch.zeros(len(sizes), 3, side, side, device=device, dtype=torch.bfloat16)
    for i, px in enumerate(sizes):
        pixels[i, :, :px, :px] = torch.randn(3, px, px, device=device)
    grids = patch_grid_sizes(torch.tensor([[px, px] for px in sizes]), vision.patch_size)

    def step(mark):
        vision(pixels, grids)
        mark()

    return {"forward_s": timer.phases(step, 1)[0], "patches": sum(r * c for r, c in grids)}


def time_projector(timer: Timer, projector: torch.nn.Module, px: int, patch: int, dv: int, device: str) -> Dict:
    grids = [(px // patch, px // patch)]
    feats = torch.randn(grids[0][0] * grids[0][1], dv, device=device, dtype=torch.bfloat16)

    def step(mark):
        out = projector(feats, grids)
        mark()
        out.backward(_grad_like(out))
        mark()

    f, bwd = timer.phases(step, 2)
    m = projector.spatial_merge_size
    return {"forward_s": f, "backward_s": bwd, "image_tokens": (grids[0][0] // m) * (grids[0][1] // m)}


def time_embeddings(timer: Timer, emb: torch.nn.Module, b: int, s: int, device: str) -> Dict[str, float]:
    tokens = torch.randint(100, emb.num_embeddings, (b, s), device=device)

    def step(mark):
        out = emb(tokens)
        mark()
        out.backward(_grad_like(out))
        mark()

    f, bwd = timer.phases(step, 2)
    return {"forward_s": f, "backward_s": bwd}


def time_head(timer: Timer, hidden: int, vocab: int, b: int, s: int, device: str) -> Dict[str, float]:
    """Final norm + head + compiled one-chunk CE (the last stage's unembed and the recipe's loss)."""
    from torchtune import training
    from torchtune.modules.loss import CEWithChunkedOutputLoss
    from torchtune_mistral3.models.mistral3._rms_norm import Mistral3RMSNorm

    norm = Mistral3RMSNorm(hidden, eps=1e-5).to(device=device, dtype=torch.bfloat16)
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=torch.bfloat16)
    torch.nn.init.normal_(head.weight, 0.0, 0.02)
    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=1)
    training.compile_loss(loss_fn, verbose=False)
    x = torch.randn(b, s, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (b, s), device=device)

    def step(mark):
        loss = loss_fn([head(norm(x))], labels)
        mark()
        loss.backward()
        mark()

    f, bwd = timer.phases(step, 2)
    return {"forward_s": f, "backward_s": bwd}


def time_optimizer(timer: Timer, numel: int, dtype: torch.dtype, fused: bool, device: str) -> Dict[str, float]:
    """One AdamW step over a decoder layer's worth of tensors holding ``numel`` elements in all."""
    shapes = [(numel // 7 // 1024, 1024)] * 7  # seven matrices, like q/k/v/o/w1/w2/w3
    params = [torch.nn.Parameter(torch.randn(sh, device=device, dtype=dtype) * 0.02) for sh in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-5, fused=fused and device == "cuda", foreach=None if fused else True)

    def step(mark):
        opt.step()
        mark()

    sec = timer.phases(step, 1)[0]
    n = sum(p.numel() for p in params)
    return {"step_s": sec, "params": n, "s_per_param": sec / n}


def time_first_stage(timer: Timer, stage: torch.nn.Module, cfg: Dict, b: int, s: int, image_px: Sequence[int],
                     device: str) -> Dict:
    """Stage 0 on a MedPix-like micro-batch: sample i has one image of ``image_px[i % len]`` px."""
    sizes = [image_px[i % len(image_px)] for i in range(b)]
    tokens, pixels, image_sizes = [], [], []
    for i, px in enumerate(sizes):
        one = make_batch(cfg, 1, s, px, device, seed=i)
        tokens.append(one["tokens"])
        pixels.append(one["pixel_values"])
        image_sizes.append(one["image_sizes"])
    side = max(sizes)
    padded = torch.zeros(b, 3, side, side, device=device, dtype=torch.bfloat16)
    for i, (p, px) in enumerate(zip(pixels, sizes)):
        padded[i, :, :px, :px] = p[0]
    tok = torch.cat(tokens)
    encoder_input = {"image": {"pixel_values": padded, "image_sizes": torch.cat(image_sizes),
                               "images_per_sample": torch.ones(b, dtype=torch.long, device=device)}}

    def step(mark):
        out = stage(tok, encoder_input=encoder_input, mask=None, input_pos=None)
        out.backward(_grad_like(out))
        mark()

    patch = cfg["vision_config"]["patch_size"]
    return {"step_s": timer.phases(step, 1)[0], "image_px": sizes,
            "image_tokens": int((tok == IMG).sum()), "patches": sum((px // patch) ** 2 for px in sizes)}


# ----------------------------------------------------------------------------------------------- main


def parse_shapes(text: str) -> List[Tuple[int, int]]:
    """``"1x2048,2x2048"`` -> ``[(1, 2048), (2, 2048)]`` (batch x sequence)."""
    out = []
    for item in text.split(","):
        b, s = item.lower().split("x")
        out.append((int(b), int(s)))
    return out


def tp_shard_config(cfg: Dict, tp: int) -> Dict:
    """The slice config with the heads and FFN of one rank of ``tp`` (hidden stays whole, as under TP)."""
    out = copy.deepcopy(cfg)
    t = out["text_config"]
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if t[key] % tp:
            raise ValueError(f"text_config.{key}={t[key]} does not split {tp} ways")
        t[key] //= tp
    return out


class Budget:
    """Wall-clock budget: sections that start after it are skipped and listed."""

    def __init__(self, seconds: float):
        self.start, self.seconds, self.skipped = time.perf_counter(), seconds, []

    def allows(self, name: str) -> bool:
        if time.perf_counter() - self.start > self.seconds:
            self.skipped.append(name)
            print(f"[budget] skipping {name}", flush=True)
            return False
        return True


def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny dims, to test the script on CPU")
    ap.add_argument("--shapes", default="1x2048,2x2048,1x4096", help="decoder-layer token shapes, BxS")
    ap.add_argument("--image-px", default="280,532,1036", help="tower image sides (multiples of 28)")
    ap.add_argument("--tp-shard", type=int, default=8, help="also time the layer/head shard of this TP degree")
    ap.add_argument("--first-layers", type=int, default=4)
    ap.add_argument("--first-cases", default="1x2048,2x2048", help="first-stage micro-batch shapes, BxS")
    ap.add_argument("--middle-layers", type=int, default=6)
    ap.add_argument("--middle-cases", default="1x2048,2x2048")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="eager (the table records which)")
    ap.add_argument("--budget-s", type=float, default=150.0, help="skip sections that would start after this")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    device, compiled = args.device, not args.no_compile
    torch._dynamo.config.cache_size_limit = 64
    timer = Timer(device, args.warmup, args.iters)
    budget = Budget(args.budget_s)
    shapes = parse_shapes(args.shapes)
    image_px = [int(x) for x in args.image_px.split(",")]
    first_cases, middle_cases = parse_shapes(args.first_cases), parse_shapes(args.middle_cases)
    if args.tiny:  # tiny widths and sequences; a TP2 shard (the tiny model has 2 KV heads)
        shapes, first_cases, middle_cases = ([(b, s // 16) for b, s in x] for x in (shapes, first_cases, middle_cases))
        image_px, args.tp_shard = [56, 112], 2
    max_s = max(s for _, s in shapes + first_cases + middle_cases)
    cfg = slice_hf_config(1, tiny=args.tiny)
    t, v = cfg["text_config"], cfg["vision_config"]
    h = t["hidden_size"]
    result = {
        "schema": SCHEMA,
        "command": "python bench/step_costs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": platform.node(),
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "tiny": args.tiny,
        "compiled": compiled,
        "dims": {"hidden": h, "ffn": t["intermediate_size"], "num_heads": t["num_attention_heads"],
                 "num_kv_heads": t["num_key_value_heads"], "head_dim": t["head_dim"], "vocab": t["vocab_size"],
                 "vision_hidden": v["hidden_size"], "vision_layers": v["num_hidden_layers"],
                 "patch_size": v["patch_size"], "merge": cfg["spatial_merge_size"]},
        "layer": {"1": []}, "head": {"1": []}, "tower": [], "projector": [], "embeddings": [],
        "optimizer": [], "slice_first": [], "slice_middle": [], "skipped": [],
    }
    if args.tp_shard > 1:
        result["layer"][str(args.tp_shard)] = []
        result["head"][str(args.tp_shard)] = []

    def save():
        result["skipped"] = budget.skipped
        result["elapsed_s"] = round(time.perf_counter() - budget.start, 1)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    def free():
        import gc

        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    # 1. middle stage: decoder layers alone (also the per-layer table), then the same with checkpointing
    n_mid = args.middle_layers
    mid = _stage(slice_hf_config(n_mid + 2, tiny=args.tiny), [1, n_mid, 1], 1, device, compiled, max_s)
    layer0 = _real_layers(mid)[0]
    for ac in (False, True):
        if ac:
            _checkpoint_layers(mid)
            layer0 = _real_layers(mid)[0]
        for b, s in shapes:
            if budget.allows(f"layer {b}x{s} ac={ac}"):
                r = dict(batch=b, seq=s, ac=ac, compiled=compiled, **time_layer(timer, layer0, b, s, h, device))
                result["layer"]["1"].append(r)
                print(f"layer tp1 {b}x{s} ac={ac}: fwd {r['forward_s'] * 1e3:.2f} ms bwd {r['backward_s'] * 1e3:.2f}",
                      flush=True)
        for b, s in middle_cases:
            if budget.allows(f"slice_middle {b}x{s} ac={ac}"):
                sec = time_stage_layers(timer, mid, b, s, h, device)
                result["slice_middle"].append({"layers": n_mid, "batch": b, "seq": s, "ac": ac, "step_s": sec})
                print(f"middle slice {n_mid} layers {b}x{s} ac={ac}: {sec * 1e3:.1f} ms", flush=True)
        save()
    del mid, layer0
    free()

    # 2. first stage: embeddings + tower + projector + layers; its parts timed on its own modules
    n_first = args.first_layers
    first = _stage(slice_hf_config(n_first + 1, tiny=args.tiny), [n_first, 1], 0, device, compiled, max_s)
    vision, projector = first.encoders["image"].vision, first.encoders["image"].projector
    for px in image_px:
        if budget.allows(f"tower {px}"):
            r = dict(image_px=[px], **time_tower(timer, vision, [px], device))
            result["tower"].append(r)
            print(f"tower {px} px ({r['patches']} patches): {r['forward_s'] * 1e3:.2f} ms", flush=True)
    if len(image_px) > 1 and budget.allows("tower mixed"):
        mixed = image_px * 2
        r = dict(image_px=mixed, **time_tower(timer, vision, mixed, device))
        result["tower"].append(r)
        print(f"tower {mixed} ({r['patches']} patches): {r['forward_s'] * 1e3:.2f} ms", flush=True)
    for px in image_px:
        if budget.allows(f"projector {px}"):
            result["projector"].append(dict(image_px=px, **time_projector(timer, projector, px, v["patch_size"],
                                                                          v["hidden_size"], device)))
    for b, s in sorted(set(shapes + first_cases)):
        if budget.allows(f"embeddings {b}x{s}"):
            result["embeddings"].append(dict(batch=b, seq=s, **time_embeddings(timer, first.tok_embeddings, b, s,
                                                                               device)))
    save()
    first_px = [532, 1036] if not args.tiny else [56, 112]
    for b, s in first_cases:
        if budget.allows(f"slice_first {b}x{s}"):
            r = dict(layers=n_first, batch=b, seq=s, ac=False,
                     **time_first_stage(timer, first, cfg, b, s, first_px, device))
            result["slice_first"].append(r)
            print(f"first slice {n_first} layers {b}x{s} images {r['image_px']}: {r['step_s'] * 1e3:.1f} ms",
                  flush=True)
    save()
    del first, vision, projector
    free()

    # 3. optimizer step per parameter
    layer_numel = 7 * (h * t["intermediate_size"]) if args.tiny else 1_384_120_320
    for dtype, fused in ((torch.bfloat16, True), (torch.float32, True), (torch.float32, False)):
        for numel in (layer_numel, layer_numel // 8):
            if budget.allows(f"optimizer {dtype} fused={fused} {numel}"):
                r = dict(dtype=str(dtype).split(".")[-1], fused=fused, **time_optimizer(timer, numel, dtype, fused,
                                                                                        device))
                result["optimizer"].append(r)
                print(f"adamw {r['dtype']} fused={fused} {r['params']}: {r['step_s'] * 1e3:.2f} ms", flush=True)
                free()
    save()

    # 4. head + loss, full vocabulary and the TP shard
    for tp in result["head"]:
        for b, s in shapes:
            if budget.allows(f"head tp{tp} {b}x{s}"):
                r = dict(batch=b, seq=s, **time_head(timer, h, t["vocab_size"] // int(tp), b, s, device))
                result["head"][tp].append(r)
                print(f"head tp{tp} {b}x{s}: fwd {r['forward_s'] * 1e3:.2f} bwd {r['backward_s'] * 1e3:.2f} ms",
                      flush=True)
        free()
    save()

    # 5. the TP shard of a decoder layer
    if args.tp_shard > 1:
        shard_cfg = tp_shard_config(slice_hf_config(3, tiny=args.tiny), args.tp_shard)
        shard = _stage(shard_cfg, [1, 1, 1], 1, device, compiled, max_s)
        for ac in (False, True):
            if ac:
                _checkpoint_layers(shard)
            layer = _real_layers(shard)[0]
            for b, s in shapes:
                if budget.allows(f"layer tp{args.tp_shard} {b}x{s} ac={ac}"):
                    r = dict(batch=b, seq=s, ac=ac, compiled=compiled, **time_layer(timer, layer, b, s, h, device))
                    result["layer"][str(args.tp_shard)].append(r)
                    print(f"layer tp{args.tp_shard} {b}x{s} ac={ac}: fwd {r['forward_s'] * 1e3:.2f} ms "
                          f"bwd {r['backward_s'] * 1e3:.2f}", flush=True)
        del shard
        free()
    save()

    # 6. an eager layer (compile: False), for the planner's compile-off layouts
    if compiled and budget.allows("eager layer"):
        eager = _stage(slice_hf_config(3, tiny=args.tiny), [1, 1, 1], 1, device, False, max_s)
        for ac in (False, True):
            if ac:
                _checkpoint_layers(eager)
            layer = _real_layers(eager)[0]
            for b, s in shapes[:2]:
                if budget.allows(f"eager layer {b}x{s} ac={ac}"):
                    r = dict(batch=b, seq=s, ac=ac, compiled=False, **time_layer(timer, layer, b, s, h, device))
                    result["layer"]["1"].append(r)
                    print(f"layer tp1 eager {b}x{s} ac={ac}: fwd {r['forward_s'] * 1e3:.2f} ms "
                          f"bwd {r['backward_s'] * 1e3:.2f}", flush=True)
        del eager
        free()
    save()

    print_checks(result)
    return result


def print_checks(result: Dict) -> None:
    """Each slice against the sum of its measured parts (the planner's prediction from this table)."""
    from torchtune_mistral3.planning._step_plan import CostTable, predict_slice

    try:
        table = CostTable(result)
    except ValueError as e:  # a section was skipped (budget): nothing to predict from
        print(f"no checks: {e}")
        return
    for kind in ("slice_middle", "slice_first"):
        for r in result[kind]:
            try:
                pred = predict_slice(table, kind, r)
            except ValueError as e:
                print(f"{kind} {r['batch']}x{r['seq']}: no prediction ({e})")
                continue
            print(f"{kind} {r['layers']} layers {r['batch']}x{r['seq']} ac={r['ac']}: measured "
                  f"{r['step_s'] * 1e3:.1f} ms, parts {pred * 1e3:.1f} ms, ratio {r['step_s'] / pred:.3f}")


if __name__ == "__main__":
    main()
