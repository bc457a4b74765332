"""Decode tokens/s of the plugin's KV-cache generation against transformers' ``generate``, same weights, same run.

    # one H200, about 3 to 4 minutes with the two inductor compiles of the decode step (docs/evaluation.md)
    python bench/decode.py --layers 4 --out bench/results/decode_h200.json
    # here, to test the script (fp32; also checks that both sides' greedy tokens agree; hf_static runs
    # uncompiled off CUDA, plugin_compile needs --compile-backend aot_eager there)
    PYTHONPATH=plugin python bench/decode.py --tiny --device cpu

One HF ``config.json`` dict (``bench/_slice.py``: every width of Mistral Medium 3.5, ``--layers`` decoder layers,
the full Pixtral tower) builds transformers' ``Mistral3ForConditionalGeneration`` (random weights on the device);
the plugin's model is built on meta and takes the very same tensors through ``mistral3_hf_to_tune``. The prompt
of each sample is ``[BOS] [INST]`` + one ``--image-px`` square image + 48 question tokens + ``[/INST]`` (a
MedPix question). Greedy decoding of exactly ``--new-tokens`` tokens on both sides (the plugin without stop
tokens, transformers with ``min_new_tokens = max_new_tokens``).

Variants (``--variants``):
    plugin_eager    ``torchtune_mistral3.generation.generate`` as the generate and eval recipes call it: a
                    prefill that projects only the last position to the vocabulary, then the eager decode step
                    ``decode_one_token`` (grouped KV heads read in place), KV caches made for the call
    plugin_compile  + ``decode_one_token`` under ``torch.compile`` (``--compile-mode``, default ``reduce-overhead``:
                    CUDA graphs; fullgraph, static shapes), KV caches set up once per batch size and reused
    hf_eager        transformers ``generate``, SDPA attention, its default dynamic cache
    hf_static       ``cache_implementation="static"``, which transformers compiles for the decode steps itself

Timing (median of ``--repeats`` after one warm-up call): ``t_n`` = a call generating ``--new-tokens`` tokens,
``t_1`` = a call generating one (prefill: vision tower + prompt + first token). Decode tokens/s =
``batch * (new_tokens - 1) / (t_n - t_1)``; the prefill row is ``t_1`` (with one image at batch 1). Ratios are
against ``hf_eager`` measured in the same run.
"""

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _slice import BOS, EOS, INST, INST_END, image_layout, slice_hf_config, write_config_dir, write_result  # noqa: E402

PAD = 11
GIB = 1024**3
VARIANTS = ("plugin_eager", "plugin_compile", "hf_eager", "hf_static")


def build_models(cfg: Dict, device: str, dtype: torch.dtype, seed: int = 0):
    """transformers' model with random weights on ``device``, and the plugin's model sharing its tensors."""
    from torchtune import training
    from torchtune_mistral3.checkpointing import mistral3_from_hf_config
    from torchtune_mistral3.models.mistral3 import mistral3_hf_to_tune
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")})
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    with training.set_default_dtype(dtype), torch.device(device):
        hf = Mistral3ForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    hf.eval()
    with training.set_default_dtype(dtype), torch.device("meta"):
        plugin = mistral3_from_hf_config(checkpoint_dir=write_config_dir(cfg))
    plugin.load_state_dict(mistral3_hf_to_tune(dict(hf.state_dict())), strict=True, assign=True)
    with training.set_default_dtype(dtype), torch.device(device):
        for m in plugin.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
    on_meta = [n for n, t in [*plugin.named_parameters(), *plugin.named_buffers()] if t.is_meta]
    if on_meta:
        raise RuntimeError(f"plugin tensors left on meta after loading: {on_meta[:5]}")
    return hf, plugin.eval()


def make_prompts(cfg: Dict, batch_size: int, image_px: int, device: str, dtype: torch.dtype, seed: int = 0) -> Dict:
    """``batch_size`` prompts of equal length, each with one ``image_px`` square image (no padding)."""
    g = torch.Generator().manual_seed(seed)
    step = cfg["vision_config"]["patch_size"] * cfg["spatial_merge_size"]
    if image_px % step:
        raise ValueError(f"--image-px {image_px} is not a multiple of {step}")
    layout = image_layout(image_px // step, image_px // step)
    vocab = cfg["text_config"]["vocab_size"]
    tokens = [
        [BOS, INST] + layout + torch.randint(100, vocab, (48,), generator=g).tolist() + [INST_END]
        for _ in range(batch_size)
    ]
    return {
        "tokens": torch.tensor(tokens, device=device),
        "image": {
            "pixel_values": torch.randn(batch_size, 3, image_px, image_px, generator=g).to(device, dtype),
            "image_sizes": torch.tensor([[image_px, image_px]] * batch_size, device=device),
            "images_per_sample": torch.ones(batch_size, dtype=torch.long, device=device),
        },
    }


def plugin_generate_fn(model, prompts: Dict, compiled: Optional[Callable]) -> Callable[[int], torch.Tensor]:
    from torchtune_mistral3.generation import generate

    def run(new_tokens: int) -> torch.Tensor:
        out = generate(
            model,
            prompts["tokens"],
            encoder_input={"image": prompts["image"]},
            max_generated_tokens=new_tokens,
            pad_id=PAD,
            top_k=1,
            stop_tokens=None,
            decode_step=compiled,
        )
        return out[:, prompts["tokens"].shape[1] :]

    return run


def hf_generate_fn(model, prompts: Dict, static: bool) -> Callable[[int], torch.Tensor]:
    def run(new_tokens: int) -> torch.Tensor:
        tokens = prompts["tokens"]
        out = model.generate(
            input_ids=tokens,
            attention_mask=torch.ones_like(tokens),
            pixel_values=prompts["image"]["pixel_values"],
            image_sizes=prompts["image"]["image_sizes"],
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=PAD,
            **({"cache_implementation": "static"} if static else {}),
        )
        return out[:, tokens.shape[1] :]

    return run


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(run: Callable[[int], torch.Tensor], new_tokens: int, device: str):
    _sync(device)
    t = time.perf_counter()
    out = run(new_tokens)
    _sync(device)
    return time.perf_counter() - t, out


@torch.inference_mode()
def time_variant(name: str, hf, plugin, prompts: Dict, args) -> Dict:
    """Warm up, then time ``repeats`` calls of ``new_tokens`` and of 1 token; return the row and the tokens."""
    from torchtune.modules.common_utils import delete_kv_caches
    from torchtune_mistral3.generation import decode_one_token, kv_cache_length

    batch, prompt_len = prompts["tokens"].shape
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = None
    if name == "plugin_compile":
        mode = args.compile_mode if args.compile_backend == "inductor" else None  # mode is inductor's option
        compiled = torch.compile(
            decode_one_token, fullgraph=True, dynamic=False, mode=mode, backend=args.compile_backend
        )
        with torch.device(args.device):  # torchtune's KVCache allocates on the default device
            length = kv_cache_length(prompt_len, args.new_tokens)  # as generate sets them up for a call
            plugin.setup_caches(batch_size=batch, dtype=args.dtype, decoder_max_seq_len=length)
    run = (
        plugin_generate_fn(plugin, prompts, compiled) if name.startswith("plugin")
        else hf_generate_fn(hf, prompts, static=name == "hf_static")
    )
    row = {"variant": name, "batch": batch, "prompt_tokens": prompt_len}
    try:
        t0 = time.perf_counter()
        _, tokens = _timed(run, args.new_tokens, args.device)  # warm-up (compiles)
        _timed(run, 1, args.device)
        row["warmup_s"] = time.perf_counter() - t0
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_n = [_timed(run, args.new_tokens, args.device)[0] for _ in range(args.repeats)]
        t_1 = [_timed(run, 1, args.device)[0] for _ in range(args.repeats)]
        if tokens.shape[1] != args.new_tokens:
            raise RuntimeError(f"{name} generated {tokens.shape[1]} tokens, not {args.new_tokens}")
        tn, t1 = statistics.median(t_n), statistics.median(t_1)
        row.update(t_n_s=t_n, t_1_s=t_1, median_t_n_s=tn, prefill_s=t1,
                   decode_tokens_per_s=batch * (args.new_tokens - 1) / (tn - t1) if tn > t1 else float("nan"),
                   end_to_end_tokens_per_s=batch * args.new_tokens / tn)
        if args.device == "cuda":
            row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        if name == "plugin_compile":
            row["compiled_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])  # 1: no recompiles
            # > 0: inductor ran the step without CUDA graphs (the reason is in the log)
            row["cudagraph_skips"] = int(torch._dynamo.utils.counters["inductor"]["cudagraph_skips"])
        if name == "hf_static":
            row["hf_compiled_decode"] = hasattr(hf, "_compiled_call") and hf._compiled_call is not None
    except Exception as e:  # one variant failing must not lose the others' numbers
        row["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        tokens = None
    finally:
        if plugin.caches_are_setup():
            delete_kv_caches(plugin)
    return row, tokens


def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny dims, fp32: test the script on CPU")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--image-px", type=int, default=1036)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--compile-mode", default="reduce-overhead")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        args.image_px = min(args.image_px, 56)
        args.new_tokens = min(args.new_tokens, 8)
        args.repeats = min(args.repeats, 1)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    if args.device != "cuda" and args.compile_backend == "inductor" and "plugin_compile" in variants:
        # (hf_static runs, uncompiled: transformers compiles its decode step on CUDA only)
        variants.remove("plugin_compile")
        print(f"skipping plugin_compile on {args.device}: CUDA graphs need CUDA (--compile-backend aot_eager runs it)")
    if "hf_eager" not in variants:
        variants.append("hf_eager")

    cfg = slice_hf_config(args.layers, tiny=args.tiny)
    t0 = time.perf_counter()
    hf, plugin = build_models(cfg, args.device, args.dtype)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "build_s": time.perf_counter() - t0, "rows": []}
    result["tokens_agree"] = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = make_prompts(cfg, batch, args.image_px, args.device, args.dtype, seed=batch)
        tokens = {}
        for v in variants:
            row, tokens[v] = time_variant(v, hf, plugin, prompts, args)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            write_result(result, args.out)  # rows so far, in case a later variant runs out of time
        ref = tokens["hf_eager"]
        for v, t in tokens.items():
            if v != "hf_eager" and t is not None and ref is not None:
                # fraction of samples whose greedy tokens equal transformers' (bf16 may diverge on random weights)
                same = (t.cpu() == ref.cpu()).all(dim=1).float().mean().item()
                result["tokens_agree"][f"{v}_b{batch}"] = same
    peers = {r["batch"]: r for r in result["rows"] if r["variant"] == "hf_eager" and "error" not in r}
    for r in result["rows"]:
        peer = peers.get(r["batch"])
        if peer and "error" not in r:
            r["decode_vs_hf_eager"] = r["decode_tokens_per_s"] / peer["decode_tokens_per_s"]
            r["prefill_speed_vs_hf_eager"] = peer["prefill_s"] / r["prefill_s"]

    print(f"{'variant':<16} {'batch':>5} {'decode tok/s':>13} {'x hf_eager':>10} {'prefill s':>10} {'x hf':>6}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['variant']:<16} {r['batch']:>5} error: {r['error'][:80]}")
            continue
        print(f"{r['variant']:<16} {r['batch']:>5} {r['decode_tokens_per_s']:13.1f} "
              f"{r.get('decode_vs_hf_eager', float('nan')):10.3f} {r['prefill_s']:10.3f} "
              f"{r.get('prefill_speed_vs_hf_eager', float('nan')):6.3f}")
    print("greedy tokens equal to hf_eager (fraction of samples):", result["tokens_agree"])
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
