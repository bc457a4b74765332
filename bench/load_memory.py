"""Peak resident memory while loading a synthetic ~2 GB FP8 checkpoint into the plugin's Mistral3 model.

Writes a checkpoint in Mistral's on-disk format (text linears FP8 E4M3 with a 0-d bf16 ``weight_scale_inv``
and an ``activation_scale``; embeddings, norms, lm_head and a small vision tower in bf16; sharded with an
index), then loads it into a bf16 model built on ``meta`` in a fresh subprocess per method and reports
that process's peak RSS (``ru_maxrss``) above its RSS just before loading:

- ``slices``: ``load_into_module`` (what the plugin recipe uses: one tensor or slice read at a time);
- ``mapping``: torchtune's ``load_from_full_model_state_dict`` fed the checkpointer's lazy mapping (the
  stock recipe's path);
- ``eager`` (the peer): read every shard with ``safetensors.torch.load_file``, dequantise everything into
  one state dict, then ``load_state_dict(assign=True)`` -- how a non-streaming loader (torchtune's stock
  HF checkpointer plus a dequantisation pass) holds the checkpoint.

Usage::

    PYTHONPATH=plugin python bench/load_memory.py [--dir /tmp/fp8_bench] [--layers 28]
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3
TEXT = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=16, num_key_value_heads=4, head_dim=128)
VOCAB = 32768
SHARD_BYTES = 512 * 1024**2


def _config(layers: int) -> dict:
    return {
        "architectures": ["Mistral3ForConditionalGeneration"],
        "model_type": "mistral3",
        "dtype": "bfloat16",
        "image_token_index": 10,
        "spatial_merge_size": 2,
        "vision_feature_layer": -1,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": False,
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "ministral3",
            "vocab_size": VOCAB,
            "num_hidden_layers": layers,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
            **TEXT,
        },
        "vision_config": {
            "model_type": "pixtral",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "patch_size": 14,
            "image_size": 224,
            "hidden_act": "silu",
        },
        "quantization_config": {
            "quant_method": "fp8",
            "activation_scheme": "static",
            "weight_block_size": None,
            "dequantize": False,
            "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
        },
    }


def _meta_model(directory: Path):
    import torch
    from torchtune import training
    from torchtune_mistral3.checkpointing import mistral3_from_hf_config

    with training.set_default_dtype(torch.bfloat16), torch.device("meta"):
        return mistral3_from_hf_config(str(directory))


def write_checkpoint(directory: Path, layers: int) -> None:
    """Write the synthetic checkpoint shard by shard (bounded memory)."""
    import torch
    from safetensors.torch import save_file
    from torchtune_mistral3.checkpointing import default_fp8_keys, quantize_per_tensor
    from torchtune_mistral3.models.mistral3 import tune_key_to_hf

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(_config(layers), indent=2))
    shapes = {k: v.shape for k, v in _meta_model(directory).state_dict().items()}
    fp8 = set(default_fp8_keys(shapes))
    shards, current, size = [], {}, 0
    g = torch.Generator().manual_seed(0)
    for key, shape in shapes.items():
        hf_key = tune_key_to_hf(key)
        value = torch.randn(shape, generator=g, dtype=torch.bfloat16) * 0.02
        if key in fp8:
            q, scale = quantize_per_tensor(value)
            current[hf_key], current[hf_key + "_scale_inv"] = q, scale
            current[hf_key[: -len("weight")] + "activation_scale"] = torch.tensor(0.01, dtype=torch.bfloat16)
            size += q.numel()
        else:
            current[hf_key] = value
            size += value.numel() * 2
        if size >= SHARD_BYTES:
            shards.append(current)
            save_file(current, directory / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
            current, size = {}, 0
    if current:
        shards.append(current)
        save_file(current, directory / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
    names = {i: f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)}
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        (directory / f"part-{i}.safetensors").rename(directory / names[i])
        weight_map.update({k: names[i] for k in shard})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(directory: Path, method: str) -> dict:
    """Run in a fresh process: build the model on meta, load it with ``method``, report memory."""
    import torch
    from safetensors.torch import load_file
    from torchtune import training
    from torchtune_mistral3.checkpointing import HFCheckpointReader, Mistral3HFCheckpointer, load_into_module
    from torchtune_mistral3.models.mistral3 import hf_key_to_tune

    model = _meta_model(directory)
    reader = HFCheckpointReader(directory)
    largest = max(_numel(reader.info(k).shape) for k in reader.keys())
    base = _rss_bytes()
    start = time.perf_counter()
    if method == "slices":
        load_into_module(model, reader)
    elif method == "mapping":
        lazy = Mistral3HFCheckpointer(str(directory), output_dir=str(directory) + "_out").load_checkpoint()["model"]
        training.load_from_full_model_state_dict(model, lazy, torch.device("cpu"), strict=True)
    elif method == "eager":
        raw = {}
        for path in sorted(directory.glob("model-*.safetensors")):
            raw.update(load_file(path))
        full = {}
        for key, value in raw.items():
            if key.endswith(("_scale_inv", "activation_scale")):
                continue
            if value.dtype == torch.float8_e4m3fn:
                value = (value.float() * raw[key + "_scale_inv"].float()).to(torch.bfloat16)
            full[hf_key_to_tune(key)] = value
        model.load_state_dict(full, strict=True, assign=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    storage = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert not any(t.is_meta for t in model.state_dict().values())
    return {
        "method": method,
        "rss_before_load": base,
        "peak_rss": peak,
        "peak_above_before": peak - base,
        "model_storage": storage,
        "largest_tensor_bf16": largest * 2,
        "seconds": seconds,
    }


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/torchtune_mistral3_fp8_bench")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--measure", choices=["slices", "mapping", "eager"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = Path(args.dir)
    if args.measure:
        print(json.dumps(measure(directory, args.measure)))
        return
    if not (directory / "model.safetensors.index.json").is_file():
        write_checkpoint(directory, args.layers)
    on_disk = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    print(f"checkpoint: {directory} ({on_disk / GIB:.2f} GiB on disk, FP8 text linears)")
    results = {}
    for method in ("slices", "mapping", "eager"):
        cmd = [sys.executable, __file__, "--dir", str(directory), "--measure", method]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[method] = r = json.loads(out.strip().splitlines()[-1])
        excess = r["peak_above_before"] - r["model_storage"]
        print(
            f"{method:8s} peak RSS {r['peak_rss'] / GIB:6.2f} GiB = before-load {r['rss_before_load'] / GIB:.2f} GiB"
            f" + {r['peak_above_before'] / GIB:.2f} GiB;  model storage {r['model_storage'] / GIB:.2f} GiB,"
            f" largest tensor (bf16) {r['largest_tensor_bf16'] / GIB:.3f} GiB,"
            f" excess over storage {excess / GIB:.3f} GiB;  {r['seconds']:.1f} s"
        )
    ratio = results["eager"]["peak_above_before"] / results["slices"]["peak_above_before"]
    print(f"eager (peer) / slices peak growth: {ratio:.2f}x")


if __name__ == "__main__":
    main()
