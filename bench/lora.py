"""LoRA step time and peak memory on the full-width Mistral Medium 3.5 slice: frozen FP8 base against a bf16 base.

    # one H200, about 1.5 minutes (docs/lora.md)
    python bench/lora.py --layers 4 --out bench/results/lora_h200.json
    # here, to test the script (fp32; checks that the FP8 base with on-the-fly dequantisation gives the loss
    # of the compute-dtype base holding the same dequantised values)
    PYTHONPATH=plugin python bench/lora.py --tiny --device cpu   # scaled_mm runs on the CPU too

The model is the plugin's :func:`~torchtune_mistral3.checkpointing.mistral3_lora_from_hf_config` with the
LoRA settings of ``configs/mistral3p5_medpix_lora.yaml`` (rank 8, alpha 32, adapters on q/k/v/output and the MLP
of every decoder layer and on the projector; tower, embeddings and head frozen), built directly on the device
from ``bench/_slice.py``'s HF config (every width of the 128B model, ``--layers`` decoder layers). Variants:

    bf16            ``fp8_base: False``: torchtune ``LoRALinear`` over a compute-dtype base (the peer)
    fp8_dequantize  ``fp8_base: True, fp8_matmul: dequantize``: FP8 bytes + per-tensor scale, dequantised per matmul
    fp8_scaled_mm   ``fp8_base: True, fp8_matmul: scaled_mm``: input quantised per tensor, ``torch._scaled_mm``

Every variant gets the same base: each decoder linear is drawn N(0, 0.02), quantised per tensor to FP8 E4M3
(scale = amax / 448, stored as a 0-d bf16 tensor as in Mistral's checkpoints); the FP8 variants keep the bytes and
the scale, the bf16 variant the dequantised values (the same bits as the FP8 base's on-the-fly dequantisation). The
other weights are drawn from a generator seeded by the parameter's name. One step = forward (with activation
checkpointing of every decoder layer, as the config has it; ``--no-ac`` turns it off), torchtune's chunked CE,
backward, Adam over the trainable parameters, ``zero_grad``. Printed: median step time, peak allocated memory,
memory after the build, first-step loss, and each ratio against ``bf16`` from the same run.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time
import traceback
import zlib
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _slice import make_batch, slice_hf_config, write_config_dir, write_result  # noqa: E402

GIB = 1024**3
VARIANTS = ("bf16", "fp8_dequantize", "fp8_scaled_mm")
FP8_CONFIG = {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None}
LORA = dict(
    lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
    apply_lora_to_mlp=True,
    apply_lora_to_output=False,
    lora_rank=8,
    lora_alpha=32,
    lora_dropout=0.0,
    decoder_trainable="lora",
    vision_trainable="frozen",
    projector_trainable="lora",
)
# the frozen decoder linears that fp8_base keeps in FP8
_BASE_LINEAR = re.compile(r"^decoder\.layers\.\d+\.(attn\.(q|k|v|output)_proj|mlp\.w[123])\.weight$")


def build(name: str, cfg: Dict, device: str, dtype: torch.dtype, ac: bool, seq_len: int):
    """The variant's LoRA model on ``device`` with the shared weights, and Adam over its trainable parameters."""
    from torchtune import modules, training
    from torchtune_mistral3.checkpointing import mistral3_lora_from_hf_config

    fp8 = name.startswith("fp8_")
    model_cfg = dict(cfg, quantization_config=FP8_CONFIG) if fp8 else cfg
    torch.manual_seed(0)
    with training.set_default_dtype(dtype), torch.device(device):
        model = mistral3_lora_from_hf_config(
            write_config_dir(model_cfg),
            max_seq_len=seq_len,  # RoPE tables for the positions used, as the config sets it
            fp8_base=fp8,
            fp8_matmul=name[len("fp8_"):] if fp8 else "dequantize",
            **LORA,
        )
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
    _init(model, fp8, dtype)
    if ac:
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-4, fused=device == "cuda")
    return model, opt


@torch.no_grad()
def _init(model: torch.nn.Module, fp8: bool, dtype: torch.dtype) -> None:
    """Same weights in every variant: FP8-quantised decoder linears, name-seeded N(0, 0.02) elsewhere."""
    from torchtune_mistral3.peft import dequantize_weight
    from torchtune_mistral3.peft._fp8_lora import FP8_DTYPE, FP8_MAX, SCALE_NAME

    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        if p.dim() < 2 or "lora_b" in name:  # norms stay 1, B stays 0 (LoRA's init)
            continue
        gen = torch.Generator(device=p.device).manual_seed(zlib.crc32(name.encode()))
        w = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32) * 0.02
        if not _BASE_LINEAR.match(name):
            p.copy_(w)
            continue
        # a 0-d bf16 scale, as Mistral's checkpoints store weight_scale_inv (the loader keeps its dtype)
        scale = (w.abs().amax() / FP8_MAX).to(torch.bfloat16)
        q = (w / scale.float()).to(FP8_DTYPE)
        if fp8:
            p.copy_(q)
            modules[name[: -len(".weight")]].register_buffer(SCALE_NAME, scale)
        else:
            p.copy_(dequantize_weight(q, scale, dtype))


def step_fn(model, opt, batch: Dict):
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=8)
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    encoder_input = {"image": {k: batch[k] for k in ("pixel_values", "image_sizes", "images_per_sample")}}
    labels = batch["labels"]
    shifted = torch.hstack((labels[:, 1:], torch.full_like(labels[:, :1], -100)))  # the recipe's shift

    def step() -> torch.Tensor:
        loss = loss_fn(model(batch["tokens"], encoder_input=encoder_input, mask=None, input_pos=None), shifted)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_variant(name: str, cfg: Dict, batch: Dict, args) -> Dict:
    row = {"variant": name}
    cuda = args.device == "cuda"
    try:
        if cuda:
            torch.cuda.empty_cache()
            base_mem = torch.cuda.memory_allocated()
        model, opt = build(name, cfg, args.device, args.dtype, args.ac, batch["tokens"].shape[1])
        if cuda:
            row["after_build_gib"] = (torch.cuda.memory_allocated() - base_mem) / GIB
        row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        row["frozen_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        step = step_fn(model, opt, batch)
        losses = [float(step()) for _ in range(args.warmup)]
        _sync(args.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            losses.append(float(step()))
            _sync(args.device)
            times.append(time.perf_counter() - t)
        row.update(step_s=times, median_step_s=statistics.median(times), losses=losses)
        if cuda:
            row["peak_allocated_gib"] = (torch.cuda.max_memory_allocated() - base_mem) / GIB
        del model, opt, step
    except Exception as e:  # one variant failing must not lose the others' numbers
        row["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    return row


def _fp8_mm_ok(device: str) -> bool:
    # torch._scaled_mm runs on the CPU too (the smoke test), and on CUDA from FP8 tensor cores on (sm_89)
    return device != "cuda" or torch.cuda.get_device_capability() >= (8, 9)


def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny dims, fp32: test the script on CPU")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--image-px", type=int, default=1036)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-ac", dest="ac", action="store_false")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        args.seq, args.image_px = min(args.seq, 96), min(args.image_px, 56)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    skipped = [v for v in variants if v == "fp8_scaled_mm" and not _fp8_mm_ok(args.device)]
    variants = [v for v in variants if v not in skipped]
    for v in skipped:
        print(f"skipping {v}: torch._scaled_mm needs CUDA capability >= 8.9")
    if "bf16" not in variants:
        variants.insert(0, "bf16")

    cfg = slice_hf_config(args.layers, tiny=args.tiny)
    batch = make_batch(cfg, args.batch, args.seq, args.image_px, args.device)
    if args.tiny:
        batch["pixel_values"] = batch["pixel_values"].float()
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "skipped": skipped, "rows": []}
    for v in variants:
        result["rows"].append(time_variant(v, cfg, batch, args))
        print(json.dumps(result["rows"][-1]), flush=True)
        write_result(result, args.out)
    peer = next(r for r in result["rows"] if r["variant"] == "bf16")
    for r in result["rows"]:
        if "error" in r or "error" in peer:
            continue
        r["step_time_vs_bf16"] = r["median_step_s"] / peer["median_step_s"]
        r["first_loss_minus_bf16"] = r["losses"][0] - peer["losses"][0]
        for key in ("peak_allocated_gib", "after_build_gib"):
            if key in r:
                r[key.replace("_gib", "_vs_bf16")] = r[key] / peer[key]

    print(f"{'variant':<16} {'step s':>8} {'x bf16':>7} {'peak GiB':>9} {'x bf16':>7} {'built GiB':>9} {'loss0':>9}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['variant']:<16} error: {r['error'][:90]}")
            continue
        print(f"{r['variant']:<16} {r['median_step_s']:8.3f} {r.get('step_time_vs_bf16', float('nan')):7.3f} "
              f"{r.get('peak_allocated_gib', float('nan')):9.2f} {r.get('peak_allocated_vs_bf16', float('nan')):7.3f} "
              f"{r.get('after_build_gib', float('nan')):9.2f} {r['losses'][0]:9.5f}")
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
