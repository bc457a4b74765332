"""Packed sequences against padded batches on the width-faithful Mistral Medium 3.5 slice (bench/_slice.py).

The same synthetic MedPix-like samples are laid out three ways and trained on (forward + backward, no optimizer
step) by the plugin's model:

    packed       whole samples first-fit into ``max_seq_len`` packs (``PackedDataset``; block-causal
                 FlexAttention mask, positions per sample), ``--pack-batch`` packs per micro-batch
    pad_longest  batches of ``--batch`` samples padded to their longest sample (the TP / FSDP layouts)
    pad_max      batches of ``--batch`` samples padded to ``max_seq_len`` (the pipeline path)

Synthetic mix (``--samples`` samples, seed 0): one image per sample, height and width drawn independently from
300..1024 px (mixed aspect), resized by the Pixtral rule (multiples of 28 px) to
``rows x ([IMG] * cols + [IMG_BREAK])`` tokens; a question of 10..40 tokens and an answer of 20..300 tokens
(+ ``</s>``), all uniform; labels on the answer. A sample is about 130..1,700 tokens (MedPix: ~575).

Reported per layout, all per real (non-padding) token or per image, all from the same run:

- ``full_step``: the whole slice (tower + projector + embeddings + N decoder layers + head + chunked CE);
- ``decoder_layers``: the N decoder layers alone, on the layout's batch shapes, mask and positions;
- ``tower``: vision tower + projector per image (the same images in every layout: its cost follows the images);
- ``projected_88_layers``: ``full_step + (88 - N) / N * decoder_layers`` (the rest of the model does not grow);
- ``attention``: the attention op alone at full width (96 query / 8 KV heads of 128), forward + backward:
  causal SDPA with shared KV heads for the padded layouts; for packs FlexAttention with the BlockMask (what the
  model runs), SDPA per sample, ``torch.nn.attention.varlen`` (flash varlen) if present, and SDPA with a dense
  boolean mask; packed outputs are checked against SDPA per sample;
- peak memory of each full step.

Ratios printed at the end: decoder-layer real tokens/s packed / pad_max and packed / pad_longest (targets >= 2.5
and >= 1.3), the same for the 88-layer projection, and block-causal attention per real token against causal
attention of pad_longest (target <= 1).

    # on one H200 (about 2 minutes: model build, FlexAttention compile, 2 passes per measurement)
    python bench/packing.py --layers 4 --out bench/results/packing_h200.json
    # here, to test the script
    PYTHONPATH=plugin python bench/packing.py --device cpu --tiny --dtype fp32 --layers 1 --samples 4 --repeats 1 \
        --warmup 0
"""

import argparse
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _slice import BOS, EOS, INST, INST_END, image_layout, slice_hf_config, write_result  # noqa: E402
from step_speed import build_plugin, matmul_peak  # noqa: E402

GIB = 1024**3
FULL_LAYERS = 88


# ----------------------------------------------------------------------------------------------- data


def synthetic_mix(n: int, vocab: int, tiny: bool, seed: int = 0) -> List[Dict]:
    """``n`` MedPix-like samples as the dataset gives them (tokens, labels, one image tensor); see the docstring."""
    from torchtune_mistral3.models.mistral3._transform import pixtral_image_size

    g = torch.Generator().manual_seed(seed)

    def uniform(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    side = (28, 84) if tiny else (300, 1024)
    question, answer = ((2, 6), (2, 20)) if tiny else ((10, 40), (20, 300))
    samples = []
    for _ in range(n):
        h, w = pixtral_image_size(uniform(*side), uniform(*side), max_image_size=1540, token_size=28)
        prompt = [BOS, INST] + image_layout(h // 28, w // 28)
        prompt += torch.randint(100, vocab, (uniform(*question),), generator=g).tolist() + [INST_END]
        reply = torch.randint(100, vocab, (uniform(*answer),), generator=g).tolist() + [EOS]
        samples.append({
            "tokens": prompt + reply,
            "labels": [-100] * len(prompt) + reply,
            "encoder_input": {"image": {"images": [torch.randn(3, h, w, generator=g)]}},
        })
    return samples


def layouts(samples: List[Dict], max_seq_len: int, batch: int, pack_batch: int) -> Dict[str, List[Dict]]:
    """Micro-batches of the three layouts (CPU tensors, collated as the recipe does)."""
    from torchtune_mistral3.data import padded_collate_mistral3, padded_collate_packed_mistral3
    from torchtune_mistral3.datasets import PackedDataset

    packs = PackedDataset(samples, [len(s["tokens"]) for s in samples], max_seq_len)
    items = [packs[i] for i in range(len(packs))]
    groups = [samples[i : i + batch] for i in range(0, len(samples), batch)]
    return {
        "packed": [padded_collate_packed_mistral3(items[i : i + pack_batch]) for i in range(0, len(items), pack_batch)],
        "pad_longest": [padded_collate_mistral3(g) for g in groups],
        "pad_max": [padded_collate_mistral3(g, pad_to_multiple_of=max_seq_len) for g in groups],
    }


def to_device(batch: Dict, device: str, dtype: torch.dtype) -> Dict:
    """The batch on ``device`` with the recipe's step preparation: block-causal mask, shifted labels."""
    from torchtune import utils
    from torchtune_mistral3.models.mistral3 import block_causal_mask

    batch = {k: v for k, v in batch.items()}
    batch["encoder_input"] = {"image": dict(batch["encoder_input"]["image"])}
    utils.batch_to_device(batch, torch.device(device))
    image = batch["encoder_input"]["image"]
    image["pixel_values"] = image["pixel_values"].to(dtype)
    if "document_ids" in batch:
        batch["mask"] = block_causal_mask(batch["document_ids"])
    labels = batch.pop("labels")
    batch["shifted"] = torch.hstack((labels[:, 1:], torch.full_like(labels[:, :1], -100)))
    return batch


# ----------------------------------------------------------------------------------------------- timing


def timed(fn: Callable[[], None], device: str, repeats: int, warmup: int) -> Dict:
    """Median seconds of ``fn`` over ``repeats`` after ``warmup`` calls, and the peak memory of the timed calls."""
    for _ in range(warmup):
        fn()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    out = {"s": statistics.median(times), "all_s": times}
    if cuda:
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
    return out


def full_step(model, loss_fn, batches: List[Dict]) -> Callable[[], None]:
    """Forward + backward of the whole model over ``batches`` (loss normalised by the answer tokens)."""
    num_tokens = sum(int((b["shifted"] != -100).sum()) for b in batches)

    def run():
        for b in batches:
            logits = model(b["tokens"], mask=b.get("mask"), encoder_input=b["encoder_input"],
                           input_pos=b.get("input_pos"))
            (loss_fn(logits, b["shifted"]) * (b["shifted"] != -100).sum() / num_tokens).backward()
            del logits
        model.zero_grad(set_to_none=True)

    return run


def compiled_vs_eager(model, loss_fn, batch: Dict) -> Dict[str, Dict[str, float]]:
    """Loss and gradients of one packed micro-batch, compiled, against the eager model with the dense mask.

    The reference is the model forced eager (``torch.compiler.set_stance("force_eager")``) with the block-causal
    mask as a dense boolean tensor (SDPA, the same meaning); ``compiled_flex`` is what ``compile: True`` runs on
    packs (FlexAttention forward and backward inside compiled blocks); ``compiled_dense`` the compiled blocks with
    the dense mask, the rounding baseline of compiling alone. Each gives the relative loss difference and the
    relative difference of all gradients together (and the worst parameter's).
    """
    d = batch["document_ids"]
    s = d.shape[1]
    dense = torch.ones(s, s, dtype=torch.bool, device=d.device).tril() & (d[:, :, None] == d[:, None])

    def loss_and_grads(mask):
        logits = model(batch["tokens"], mask=mask, encoder_input=batch["encoder_input"],
                       input_pos=batch.get("input_pos"))
        loss = loss_fn(logits, batch["shifted"])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return float(loss.detach()), grads

    with torch.compiler.set_stance("force_eager"):
        ref_loss, ref = loss_and_grads(dense)
    ref_norm = sum(float(g.float().norm()) ** 2 for g in ref.values()) ** 0.5
    out = {"reference_loss": ref_loss}
    for name, mask in (("compiled_flex", batch["mask"]), ("compiled_dense", dense)):
        loss, grads = loss_and_grads(mask)
        diff = {n: float((grads[n].float() - g.float()).norm()) for n, g in ref.items()}
        worst = max(diff, key=lambda n: diff[n] / max(float(ref[n].float().norm()), 1e-30))
        out[name] = {"loss": loss, "loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss),
                     "grads_rel_diff": sum(v ** 2 for v in diff.values()) ** 0.5 / ref_norm,
                     "worst_param": worst, "worst_param_rel_diff": diff[worst] / float(ref[worst].float().norm())}
        del grads
    return out


def fp32_compiled_check(args, cases_cpu: Dict[str, List[Dict]]) -> Dict:
    """:func:`compiled_vs_eager` on a 1-layer full-width slice in fp32, where the kernels must agree to ~1e-5."""
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    model = build_plugin(slice_hf_config(1, tiny=args.tiny), args.device, compile_model=True, ac=False,
                         max_seq_len=args.max_seq_len or (256 if args.tiny else 2048)).float()
    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=8)
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    out = compiled_vs_eager(model, loss_fn, to_device(cases_cpu["packed"][0], args.device, torch.float32))
    del model
    torch._dynamo.reset()  # compiled graphs hold the model's parameters
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return out


def layers_step(model, batches: List[Dict], hidden: int, dtype: torch.dtype) -> Callable[[], None]:
    """Forward + backward of the decoder layers alone on the batches' shapes, masks and positions."""
    inputs = [torch.randn(*b["tokens"].shape, hidden, device=b["tokens"].device, dtype=dtype) * 0.1
              for b in batches]

    def run():
        for b, x in zip(batches, inputs):
            h = x.requires_grad_(True)
            for layer in model.decoder.layers:
                h = layer(h, mask=b.get("mask"), input_pos=b.get("input_pos"))
            h.backward(torch.ones_like(h))
            x.grad = None
        model.zero_grad(set_to_none=True)

    return run


def tower_step(model, batches: List[Dict]) -> Callable[[], None]:
    """Vision tower (frozen) + projector (trained) forward + backward over the images of ``batches``."""
    encoder = model.encoders["image"]

    def run():
        for b in batches:
            image = b["encoder_input"]["image"]
            encoder(image["pixel_values"], image["image_sizes"]).float().sum().backward()
        model.zero_grad(set_to_none=True)

    return run


# ----------------------------------------------------------------------------------------------- attention


def _qkv(b: int, s: int, heads: int, kv_heads: int, dim: int, device: str, dtype: torch.dtype):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, heads, s, dim, device=device, dtype=dtype, generator=g)
    k = torch.randn(b, kv_heads, s, dim, device=device, dtype=dtype, generator=g)
    v = torch.randn(b, kv_heads, s, dim, device=device, dtype=dtype, generator=g)
    return [t.requires_grad_(True) for t in (q, k, v)]


def _per_sample_sdpa(q, k, v, seq_lens: List[List[int]]):
    """Causal SDPA per sample of each pack (shared KV heads), concatenated back."""
    rows = []
    for i, lens in enumerate(seq_lens):
        parts = zip(q[i : i + 1].split(lens, dim=2), k[i : i + 1].split(lens, dim=2), v[i : i + 1].split(lens, dim=2))
        rows.append(torch.cat([F.scaled_dot_product_attention(a, b_, c, is_causal=True, enable_gqa=True)
                               for a, b_, c in parts], dim=2))
    return torch.cat(rows, dim=0)


def _varlen(q, k, v, seq_lens: List[List[int]]):
    """torch's flash varlen attention over all samples of all packs (one [T, H, D] sequence)."""
    from torch.nn.attention.varlen import varlen_attn

    lens = [n for row in seq_lens for n in row]
    cu = torch.tensor([0] + lens, device=q.device).cumsum(0).to(torch.int32)
    flat = [t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (q, k, v)]
    params = inspect.signature(varlen_attn).parameters
    kwargs = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    else:  # an older varlen without GQA: expand the KV heads
        rep = q.shape[1] // k.shape[1]
        flat[1], flat[2] = (t.repeat_interleave(rep, dim=1) for t in flat[1:])
    out = varlen_attn(*flat, cu, cu, max(lens), max(lens), **kwargs)
    return out.reshape(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)


# FlexAttention kernel options tried by --flex-sweep: name -> (kernel_options, BlockMask block size). Block names
# are per kernel (BLOCK_M/N forward, BLOCK_M1/N1/M2/N2 backward); fwd_/bwd_ prefixes split warps and stages.
FLEX_SWEEP = {
    "default": ({}, 128),
    "tma": ({"USE_TMA": True}, 128),
    "fwd_128x128_w8": ({"BLOCK_M": 128, "BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2}, 128),
    "fwd_128x64_w8_s3": ({"BLOCK_M": 128, "BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 3}, 128),
    "bwd_64x128_w8": ({"BLOCK_M1": 64, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 64, "bwd_num_warps": 8,
                       "bwd_num_stages": 3}, 128),
    "bwd_64x64_w4": ({"BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64, "bwd_num_warps": 4,
                      "bwd_num_stages": 3}, 128),
    "bwd_32x64_w4": ({"BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32, "bwd_num_warps": 4,
                      "bwd_num_stages": 3}, 128),
    "mask64": ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}, 64),
    "tma_fwd_128x64_w8_bwd_64x128_w8": ({"USE_TMA": True, "BLOCK_M": 128, "BLOCK_N": 64, "fwd_num_warps": 8,
                                         "fwd_num_stages": 3, "BLOCK_M1": 64, "BLOCK_N1": 128, "BLOCK_M2": 128,
                                         "BLOCK_N2": 64, "bwd_num_warps": 8, "bwd_num_stages": 3}, 128),
}


def flex_sweep(packed: List[Dict], ref_lens: List[List[int]], dims: Dict, device: str, dtype: torch.dtype,
               repeats: int, warmup: int, autotune: bool) -> Dict:
    """Forward + backward of block-causal FlexAttention on the packs for each ``FLEX_SWEEP`` entry (CUDA only).

    With ``autotune`` also flex compiled with ``mode="max-autotune-no-cudagraphs"`` (inductor's own search; its
    compile time is reported). Each entry's forward is checked against SDPA per sample on the first pack.
    """
    from torch.nn.attention.flex_attention import flex_attention
    from torchtune_mistral3.models.mistral3._attention import _flex_attention_gqa, flex_block_causal_mask

    heads, kv_heads, dim = dims["num_attention_heads"], dims["num_key_value_heads"], dims["head_dim"]
    tensors = [_qkv(*b["tokens"].shape, heads, kv_heads, dim, device, dtype) for b in packed]
    out = {}
    variants = dict(FLEX_SWEEP)
    if autotune:
        variants["max_autotune"] = (None, 128)
    for name, (options, block) in variants.items():
        masks = [flex_block_causal_mask(b["document_ids"], block_size=block) for b in packed]
        if options is None:
            tuned = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")

            def attend(q, k, v, m, fn=tuned):
                return fn(q, k, v, block_mask=m, enable_gqa=True)
        else:

            def attend(q, k, v, m, o=options):
                return _flex_attention_gqa(q, k, v, m, kernel_options=o)

        def run(masks=masks, attend=attend):
            for m, (q, k, v) in zip(masks, tensors):
                attend(q, k, v, m).backward(torch.ones_like(q))
                for t in (q, k, v):
                    t.grad = None

        try:
            t0 = time.perf_counter()
            run()  # compiles
            compile_s = time.perf_counter() - t0
            r = timed(run, device, repeats, warmup)
            r["first_call_s"] = compile_s
            with torch.no_grad():
                q, k, v = _qkv(*packed[0]["tokens"].shape, heads, kv_heads, dim, device, dtype)
                ref = _per_sample_sdpa(q, k, v, ref_lens[0]).float()
                r["max_abs_diff_vs_per_sample"] = float((attend(q, k, v, masks[0]).float() - ref).abs().max())
            out[name] = r
        except Exception as e:  # noqa: BLE001 - a config the kernel refuses is reported, the others still run
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"flex sweep {name:34s} {_fmt(out[name])}", flush=True)
    return out


def sample_lengths(packed: List[Dict]) -> List[List[List[int]]]:
    """Token counts of the samples (the padding tail included) of every pack of every packed micro-batch."""
    return [[[int(n) for n in torch.unique_consecutive(d, return_counts=True)[1]] for d in b["document_ids"]]
            for b in packed]


class _FlashVarlenGQA(torch.autograd.Function):
    """torch's flash varlen kernels (``aten._flash_attention_forward/backward``) with the KV heads shared in place."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0,
                                                                          True, False)
        ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
        ctx.max_len = max_len
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(grad.contiguous(), q, k, v, out, lse, cu, cu,
                                                              ctx.max_len, ctx.max_len, 0.0, True, rng, unused)
        return dq, dk, dv, None, None


def _varlen_gqa(q, k, v, seq_lens: List[List[int]], padded_to: Optional[int] = None):
    """Flash varlen over all samples of all packs, 8 KV heads read by the 96 query heads (no copies).

    ``padded_to``: per-pack sample boundaries padded with empty samples to that many per pack, and the longest
    sample taken as the pack length (what a model can know without reading lengths back to the host).
    """
    s = q.shape[2]
    if padded_to is None:
        lens = [n for row in seq_lens for n in row]
        max_len = max(lens)
    else:
        lens = [n for row in seq_lens for n in row + [0] * (padded_to - len(row))]
        max_len = s
    cu = torch.tensor([0] + lens, device=q.device).cumsum(0).to(torch.int32)
    flat = [t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (q, k, v)]
    out = _FlashVarlenGQA.apply(*flat, cu, max_len)
    return out.view(q.shape[0], s, q.shape[1], q.shape[3]).transpose(1, 2)


def attention_cases(
    cases: Dict[str, List[Dict]], dims: Dict, device: str, dtype: torch.dtype, repeats: int, warmup: int
) -> Dict:
    """Forward + backward of the attention op alone for each layout's micro-batches (see the module docstring)."""
    from torchtune_mistral3.models.mistral3._attention import _flex_attention_gqa

    heads, kv_heads, dim = dims["num_attention_heads"], dims["num_key_value_heads"], dims["head_dim"]
    out = {}

    def measure(name: str, batches: List[Dict], attend: Callable) -> None:
        tensors = [_qkv(*b["tokens"].shape, heads, kv_heads, dim, device, dtype) for b in batches]

        def run():
            for b, (q, k, v) in zip(batches, tensors):
                attend(b, q, k, v).backward(torch.ones_like(q))
                for t in (q, k, v):
                    t.grad = None

        try:
            out[name] = timed(run, device, repeats, warmup)
        except Exception as e:  # noqa: BLE001 - an unavailable kernel is reported, the others still run
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"attention {name:28s} {_fmt(out[name])}", flush=True)

    def causal(b, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    measure("pad_longest_sdpa_causal", cases["pad_longest"], causal)
    measure("pad_max_sdpa_causal", cases["pad_max"], causal)
    packed = cases["packed"]
    lens = sample_lengths(packed)
    index = {id(b): i for i, b in enumerate(packed)}
    if device == "cuda":
        measure("packed_flex_blockmask", packed, lambda b, q, k, v: _flex_attention_gqa(q, k, v, b["mask"]))
        rep = heads // kv_heads  # the KV heads copied per query head: the backward's grid runs over KV heads
        measure("packed_flex_expanded_kv", packed, lambda b, q, k, v: _flex_attention_gqa(
            q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), b["mask"]))
    else:
        out["packed_flex_blockmask"] = {"skipped": "FlexAttention has no backward on the CPU"}
    measure("packed_sdpa_per_sample", packed, lambda b, q, k, v: _per_sample_sdpa(q, k, v, lens[index[id(b)]]))
    if device == "cuda":
        measure("packed_varlen", packed, lambda b, q, k, v: _varlen(q, k, v, lens[index[id(b)]]))
        measure("packed_flash_varlen_gqa", packed, lambda b, q, k, v: _varlen_gqa(q, k, v, lens[index[id(b)]]))
        measure("packed_flash_varlen_gqa_padded", packed,
                lambda b, q, k, v: _varlen_gqa(q, k, v, lens[index[id(b)]], padded_to=16))
    else:
        out["packed_varlen"] = {"skipped": "flash varlen is CUDA only"}

    def dense(b, q, k, v):
        m = b["dense_mask"] if isinstance(b["mask"], BlockMask) else b["mask"]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None], enable_gqa=True)

    for b in packed:
        if isinstance(b["mask"], BlockMask):  # the same mask as a dense boolean tensor
            d = b["document_ids"]
            s = d.shape[1]
            b["dense_mask"] = torch.ones(s, s, dtype=torch.bool, device=d.device).tril() & (d[:, :, None] == d[:, None])
    measure("packed_sdpa_dense_mask", packed, dense)

    # agreement of the packed kernels with SDPA per sample (bf16, forward)
    with torch.no_grad():
        b = packed[0]
        q, k, v = _qkv(*b["tokens"].shape, heads, kv_heads, dim, device, dtype)
        ref = _per_sample_sdpa(q, k, v, lens[0]).float()
        checks = {"sdpa_dense_mask": lambda: dense(b, q, k, v)}
        if device == "cuda":
            checks["flex_blockmask"] = lambda: _flex_attention_gqa(q, k, v, b["mask"])
            checks["varlen"] = lambda: _varlen(q, k, v, lens[0])
            checks["flash_varlen_gqa"] = lambda: _varlen_gqa(q, k, v, lens[0])
            checks["flash_varlen_gqa_padded"] = lambda: _varlen_gqa(q, k, v, lens[0], padded_to=16)
        for name, fn in checks.items():
            try:
                out[f"max_abs_diff_{name}_vs_per_sample"] = float((fn().float() - ref).abs().max())
            except Exception as e:  # noqa: BLE001
                out[f"max_abs_diff_{name}_vs_per_sample"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


# ----------------------------------------------------------------------------------------------- main


def measure_model(result: Dict, cfg: Dict, cases: Dict[str, List[Dict]], samples: List[Dict], args, dtype,
                  real: int, images: int) -> None:
    """Tower, full step and decoder layers of each layout on the slice, into ``result`` (see the docstring)."""
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    t_start = time.perf_counter()
    max_seq_len = result["max_seq_len"]
    text = cfg["text_config"]
    model = build_plugin(cfg, args.device, compile_model=args.compile, ac=False, max_seq_len=max_seq_len)
    if dtype != torch.bfloat16:  # the CPU smoke in fp32 (a bf16 model keeps its fp32 RoPE tables)
        model = model.to(dtype)
    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=8)
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    result["build_s"] = time.perf_counter() - t_start
    result["compiled"] = bool(args.compile)
    if args.compile:
        result["packed_compiled_vs_eager"] = compiled_vs_eager(model, loss_fn, cases["packed"][0])
        print(f"packed, compiled vs eager (bf16): {result['packed_compiled_vs_eager']}", flush=True)

    tower = timed(tower_step(model, cases["pad_longest"]), args.device, args.repeats, args.warmup)
    result["tower"] = dict(tower, s_per_image=tower["s"] / images)
    print(f"tower + projector {_fmt(tower)}  {tower['s'] / images * 1e3:.2f} ms/image", flush=True)
    for name, batches in cases.items():
        r = result["layouts"][name]
        r["full_step"] = timed(full_step(model, loss_fn, batches), args.device, args.repeats, args.warmup)
        r["decoder_layers"] = timed(
            layers_step(model, batches, text["hidden_size"], dtype), args.device, args.repeats, args.warmup
        )
        full_s, layers_s = r["full_step"]["s"], r["decoder_layers"]["s"]
        projected = full_s + (FULL_LAYERS - args.layers) / args.layers * layers_s
        r["real_tokens_per_s"] = {
            "full_step_slice": real / full_s,
            "decoder_layers": real / layers_s,
            "projected_88_layers": real / projected,
        }
        r["decoder_layer_s_per_real_token"] = layers_s / args.layers / real
        r["projected_88_layers_s"] = projected
        print(f"{name:12s} full {_fmt(r['full_step'])} | layers {_fmt(r['decoder_layers'])} | "
              f"88-layer projection {projected:.2f} s, {real / projected:.0f} real tok/s", flush=True)
        if args.out:
            write_result(result, args.out)
    del model



def ratios(result: Dict) -> Dict[str, Optional[float]]:
    """The headline ratios (see the docstring); None where a measurement is missing or failed."""
    lay, att = result["layouts"], result["attention"]

    def tps(name, key):
        return lay[name].get("real_tokens_per_s", {}).get(key)

    out = {}
    for key, short in (("decoder_layers", "decoder_layers"), ("projected_88_layers", "projected_88")):
        out[f"{short}_packed_vs_pad_max"] = _ratio(tps("packed", key), tps("pad_max", key))
        out[f"{short}_packed_vs_pad_longest"] = _ratio(tps("packed", key), tps("pad_longest", key))
    base = att.get("pad_longest_sdpa_causal", {}).get("s")
    for name in ("packed_flex_blockmask", "packed_flex_expanded_kv", "packed_sdpa_per_sample", "packed_varlen",
                 "packed_flash_varlen_gqa", "packed_flash_varlen_gqa_padded", "packed_sdpa_dense_mask"):
        # same real tokens in every layout: time ratio = per-real-token ratio (< 1 is faster than unpacked)
        out[f"attention_{name}_vs_pad_longest_per_real_token"] = _ratio(att.get(name, {}).get("s"), base)
    for name, r in result.get("flex_sweep", {}).items():
        out[f"attention_flex_{name}_vs_pad_longest_per_real_token"] = _ratio(r.get("s"), base)
    return out


def _fmt(r: Dict) -> str:
    if "s" not in r:
        return str(r.get("error", r.get("skipped")))[:120]
    return f"{r['s'] * 1e3:9.1f} ms  peak {r.get('peak_allocated_gib', float('nan')):6.1f} GiB"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if not a or not b else a / b


def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny dims and images, to test the script on CPU")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the slice")
    ap.add_argument("--samples", type=int, default=48, help="synthetic samples (48: ~8%% padding in the packs)")
    ap.add_argument("--max-seq-len", type=int, default=None, help="default 2048 (256 with --tiny)")
    ap.add_argument("--batch", type=int, default=8, help="samples per padded micro-batch")
    ap.add_argument("--pack-batch", type=int, default=1, help="packs per micro-batch")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes over the data per measurement")
    ap.add_argument("--warmup", type=int, default=1, help="untimed passes first (compiles FlexAttention)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="fp32 makes the CPU smoke fast")
    ap.add_argument("--compile", action="store_true", help="compile the slice's blocks (torchtune compile_model)")
    ap.add_argument("--fp32-check", action="store_true", help="with --compile: also the fp32 1-layer check")
    ap.add_argument("--attention-tp", type=int, default=1,
                    help="time the attention of one rank of a TP group of this size (heads / N, KV heads / N)")
    ap.add_argument("--attention-only", action="store_true", help="only the attention measurements (no model)")
    ap.add_argument("--flex-sweep", action="store_true", help="also time FlexAttention kernel options (CUDA)")
    ap.add_argument("--autotune", action="store_true", help="with --flex-sweep: also inductor's max-autotune")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    max_seq_len = args.max_seq_len or (256 if args.tiny else 2048)
    cfg = slice_hf_config(args.layers, tiny=args.tiny)
    text = cfg["text_config"]
    samples = synthetic_mix(args.samples, text["vocab_size"], args.tiny)
    cases_cpu = layouts(samples, max_seq_len, args.batch, args.pack_batch)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cases = {name: [to_device(b, args.device, dtype) for b in batches] for name, batches in cases_cpu.items()}
    real = sum(len(s["tokens"]) for s in samples)
    images = len(samples)
    result = {
        "command": "python bench/packing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": platform.node(),
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "layers": args.layers,
        "max_seq_len": max_seq_len,
        "samples": args.samples,
        "images": images,
        "real_tokens": real,
        "sample_tokens": {"min": min(len(s["tokens"]) for s in samples), "max": max(len(s["tokens"]) for s in samples),
                          "mean": real / len(samples)},
        "matmul_peak_tflops": matmul_peak(args.device),
        "layouts": {},
    }
    for name, batches in cases.items():
        slots = sum(b["tokens"].numel() for b in batches)
        result["layouts"][name] = {"micro_batches": len(batches), "shape": list(batches[0]["tokens"].shape),
                                   "token_slots": slots, "padding_fraction": 1 - real / slots}
        print(f"{name:12s} {len(batches)} micro-batches of {list(batches[0]['tokens'].shape)}, "
              f"padding {1 - real / slots:.1%}", flush=True)

    torch._dynamo.config.cache_size_limit = 64
    if args.compile and args.fp32_check:
        result["packed_compiled_vs_eager_fp32_1layer"] = fp32_compiled_check(args, cases_cpu)
        print("packed, compiled vs eager (fp32, 1 layer):", result["packed_compiled_vs_eager_fp32_1layer"], flush=True)
    if not args.attention_only:
        measure_model(result, cfg, cases, samples, args, dtype, real, images)
    # --attention-tp N: the attention of one rank of a TP N group (heads and KV heads split N ways)
    heads = {k: text[k] // args.attention_tp for k in ("num_attention_heads", "num_key_value_heads")}
    result["attention_tp"] = args.attention_tp
    result["attention"] = attention_cases(cases, {**text, **heads}, args.device, dtype, args.repeats, args.warmup)
    if args.flex_sweep and args.device == "cuda":
        result["flex_sweep"] = flex_sweep(cases["packed"], sample_lengths(cases["packed"]), {**text, **heads},
                                          args.device, dtype, args.repeats, args.warmup, args.autotune)
    result["ratios"] = ratios(result)
    result["total_s"] = time.perf_counter() - t_start
    print(json.dumps(result["ratios"], indent=1))
    print(f"total {result['total_s']:.0f} s")
    if args.out:
        write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
