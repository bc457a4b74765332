"""End to end: the shipped ``tune run`` on a MedPix-like workload, beside transformers and the fixed-shape step.

    # on one GPU (about 15 minutes at 3B; docs/performance.md, "End to end", says what to install)
    python bench/e2e.py --workdir e2e_work --out e2e.json --steps 220 --modes padded,packed --peer --fixed-shape
    # here, on CPU (what tests/bench/test_e2e.py runs): the tiny demo model, a few steps
    PYTHONPATH=plugin python bench/e2e.py --smoke --steps 6 --rows 40 --modes padded,packed --peer

What it does, in one process that launches the real command:

1. writes a random-weight checkpoint in Mistral's FP8 on-disk format with ``write_demo_checkpoint``: by default the
   shape of Ministral-3 3B (every width read from the plugin's ``ministral3_3b`` builder: 26 x 3072 decoder, tied
   head, 24-layer Pixtral tower, Ministral-3 YaRN); ``--size 128b --layers N``: Mistral Medium 3.5's widths at N
   decoder layers; ``--smoke``: the demo's tiny model;
2. builds a MedPix-like workload: ``--rows`` rows (default 1000) in the MedPix-VQA schema (``image_id`` as an HF
   ``Image``, ``mode``, ``case_id``, ``question``, ``answer``) as a local parquet file. The lengths and image sizes
   are drawn from the planner's MedPix model (``torchtune_mistral3/planning/_padding_model.py``; one set of
   numbers for both): answers log-normal with a median of 75 tokens and sigma 0.75 (mean ~100 tokens, a long tail
   cut at 600), questions uniform in 10-30 tokens, images whose long side is log-uniform in 256-1200 px, aspect
   (short / long) uniform in 0.5-1, half portrait, half landscape. Why: NeMo AutoModel's Ministral-3 3B MedPix CI
   logs ~830 label tokens and ~4,600 tokens per step of 8 samples (about 100 answer tokens and 575 tokens per
   sample); MedPix questions run 10-40 tokens; MedPix images are CT/MR/X-ray exports from 256 px to over 1,000 px
   on the long side in every orientation. At ``tokenizer.max_image_size`` 1024 the model gives ~572 tokens per
   sample. Images are crops (at the drawn aspect, random position) of the bundled real images
   (``assets/medpix_sample``, CT/MR/CR/NM/US from pydicom's test files) resized to the drawn size, stored as JPEG;
   question and answer texts are words of the bundled sample's questions and answers, cut to the drawn token count
   with the run's tokenizer. No downloads.
3. runs ``python -m torchtune._cli.tune run full_finetune_distributed --config ministral3_3b_medpix_single_device``
   with overrides only (the checkpoint, ``dataset.source=parquet``, the data file, the steps, packed or padded,
   ``num_workers``, the disk logger) for ``--steps`` optimizer steps, once per mode: ``padded`` (the config as
   shipped: 4 samples x 2 accumulation, each batch padded to its longest sample) and ``packed``
   (``dataset.packed=True batch_size=2``: 2 packs of 2048 tokens x 2 accumulation);
4. reads the run's metric log (``DiskLogger``: per step ``step_time_s``, ``data_wait_s``, ``compiled_graphs``,
   ``real_tokens``, ``samples``, ``padding_fraction``, peak memory, ``unix_time_s``) and reports: time to the first
   step and to steady state (from launch), steady step time (median after ``--warmup-steps``), real tokens/s/GPU
   (real tokens over step time after warm-up), MFU on real tokens (the planner's FLOP count,
   ``model_flops_per_step``, per sample of the workload, over the GPU's dense bf16 peak), graphs compiled after
   warm-up (dynamo's counter: recompiles), the data-wait share of step time, peak memory, and the planner's
   prediction for the same layout and lengths (``plan.sample_lengths``);
5. ``--peer``: transformers' ``Mistral3ForConditionalGeneration`` built from the same ``config.json`` (random
   weights, fp32, vision tower frozen, gradient checkpointing as the config's activation checkpointing), its own
   processing (``PixtralImageProcessorPil``, transformers' slow path: the fast ``PixtralProcessor`` imports
   torchvision, which the GPU image may lack; the ``[IMG]`` row layout PixtralProcessor writes; transformers' tekken
   tokenizer, ``convert_tekken_tokenizer``), a plain loop over
   the same rows (bf16 autocast, fused AdamW on CUDA, 4 samples x 2 accumulation, padded to the longest) for
   ``--peer-steps`` steps (fewer than the plugin's: its steady state comes after the first steps);
6. ``--fixed-shape``: the project's fixed-shape step benchmark (``bench/step_speed.py``'s ``run_variant``,
   ``plugin_compile_ac_c1``: per-layer compile, activation checkpointing, compiled one-chunk loss) on this model at
   the run's shapes: padded, the mean padded length x 4 with one square image of the workload's mean image
   tokens; packed, 2048 x 2 with one such image per sequence (a pack holds about 3.5 images and block-causal
   attention, so this is the nearest fixed shape, not the same work).

Prints a table and the ratios (packed / padded, plugin / peer, e2e / fixed-shape step) and writes everything as JSON
(``--out``), after each phase so a run stopped part-way keeps what it measured.
"""

import argparse
import io
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CONFIG = "ministral3_3b_medpix_single_device"
GIB = 1024**3
# the shipped config's batch (4 samples x 2 accumulation); packed: 2 packs of max_seq_len x 2 accumulation
PACKED_BATCH = 2
MODES = {"padded": [], "packed": ["dataset.packed=True", f"batch_size={PACKED_BATCH}"]}
# a step slower than this multiple of the steady median is a warm-up (compile) step
STEADY_FACTOR = 1.5


# ------------------------------------------------------------------------------------------------ checkpoint


def model_hf_config(size: str, layers: Optional[int] = None) -> Dict[str, Any]:
    """HF ``config.json`` of a named size, every width read from the plugin's builder of that size.

    Args:
        size (str): ``3b`` (Ministral-3 3B) or ``128b`` (Mistral Medium 3.5).
        layers (Optional[int]): decoder layers (default: the model's).

    Returns:
        Dict[str, Any]: the config (``Mistral3ForConditionalGeneration``, text ``ministral3``, vision ``pixtral``).
    """
    from torchtune_mistral3.checkpointing import DEMO_HF_CONFIG
    from torchtune_mistral3.models.mistral3 import _model_builders
    from torchtune_mistral3.planning._memory_plan import build_meta_model, model_dims

    if size == "128b":  # bench/step_speed.py's width-faithful Mistral Medium 3.5 slice
        from _slice import slice_hf_config

        return slice_hf_config(layers or 88)
    dims = model_dims(build_meta_model(None, size="ministral3_3b"))
    rope = _model_builders._MINISTRAL3_ROPE  # the ministral3_3b builder's RoPE arguments
    text = dict(
        DEMO_HF_CONFIG["text_config"], vocab_size=dims.vocab_size, hidden_size=dims.hidden,
        intermediate_size=dims.ffn, num_hidden_layers=layers or dims.num_layers, num_attention_heads=dims.num_heads,
        num_key_value_heads=dims.num_kv_heads, head_dim=dims.head_dim, max_position_embeddings=262144,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "type": "yarn", "rope_theta": rope["rope_base"],
                         "factor": rope["rope_scaling_factor"],
                         "original_max_position_embeddings": rope["rope_original_max_seq_len"],
                         "beta_fast": rope["rope_beta_fast"], "beta_slow": rope["rope_beta_slow"],
                         "mscale": rope["rope_mscale"], "mscale_all_dim": rope["rope_mscale_all_dim"],
                         "llama_4_scaling_beta": rope["llama4_scaling_beta"]},
    )
    vision = dict(DEMO_HF_CONFIG["vision_config"], hidden_size=dims.vision_hidden, intermediate_size=dims.vision_ffn,
                  num_hidden_layers=dims.vision_layers, num_attention_heads=dims.vision_heads,
                  head_dim=dims.vision_hidden // dims.vision_heads)
    return dict(DEMO_HF_CONFIG, text_config=text, vision_config=vision, tie_word_embeddings=True)


def write_checkpoint(directory: Path, size: str, layers: Optional[int], smoke: bool) -> Path:
    """The random-weight FP8 checkpoint (written once per shape: ``write_demo_checkpoint`` keeps a matching one)."""
    from torchtune_mistral3.checkpointing import write_demo_checkpoint

    return write_demo_checkpoint(str(directory), hf_config=None if smoke else model_hf_config(size, layers))


# ------------------------------------------------------------------------------------------------ workload


def _sample_images():
    """The bundled sample's distinct real images, 8-bit RGB (the plugin's medical-image conversion)."""
    import pyarrow.parquet as pq
    from PIL import Image
    from torchtune_mistral3.datasets import MEDPIX_SAMPLE_DIR
    from torchtune_mistral3.models.mistral3._transform import medical_image_to_rgb

    seen, images, texts = set(), [], []
    for split in ("train", "validation"):
        for row in pq.read_table(MEDPIX_SAMPLE_DIR / f"{split}.parquet").to_pylist():
            texts += row["question"].split() + row["answer"].split()
            if row["case_id"] not in seen:
                seen.add(row["case_id"])
                images.append(medical_image_to_rgb(Image.open(io.BytesIO(row["image_id"]["bytes"]))))
    return images, texts


def _text(words: List[str], tokens: int, tokenizer, rng) -> str:
    """Words drawn from ``words`` until the text has ``tokens`` tokens (then cut to exactly that many words' worth)."""
    out: List[str] = []
    while len(tokenizer.encode(" ".join(out), add_bos=False, add_eos=False)) < tokens:
        out += list(rng.choice(words, size=max(1, (tokens - len(out)) // 2)))
    while len(out) > 1 and len(tokenizer.encode(" ".join(out[:-1]), add_bos=False, add_eos=False)) >= tokens:
        out.pop()
    return " ".join(out)


def build_workload(path: Path, rows: int, tokenizer, seed: int = 0) -> Dict[str, Any]:
    """Write ``rows`` MedPix-schema rows to ``path`` (parquet); return what was drawn (see the module docstring).

    Args:
        path (Path): the parquet file.
        rows (int): rows.
        tokenizer: the run's transform (its ``encode`` counts the text tokens).
        seed (int): random seed. Default is 0.

    Returns:
        Dict[str, Any]: ``image_hw`` (per row), ``question_tokens``, ``answer_tokens`` (as drawn).
    """
    import datasets
    from PIL import Image
    from torchtune_mistral3.planning._padding_model import medpix_sample_shapes

    shapes = medpix_sample_shapes(rows, seed)
    rng = np.random.default_rng(seed + 1)
    images, words = _sample_images()
    cells: Dict[str, List[Any]] = {"image_id": [], "mode": [], "case_id": [], "question": [], "answer": []}
    sizes = []
    for i in range(rows):
        src = images[i % len(images)]
        long_side, short_side = int(shapes["long_side_px"][i]), int(shapes["short_side_px"][i])
        h, w = (long_side, short_side) if shapes["portrait"][i] else (short_side, long_side)
        # the largest crop of aspect w / h inside the source, at a random place, resized to (w, h)
        scale = min(src.width / w, src.height / h)
        cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
        x, y = int(rng.integers(0, src.width - cw + 1)), int(rng.integers(0, src.height - ch + 1))
        image = src.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        cells["image_id"].append({"bytes": buf.getvalue(), "path": None})
        cells["mode"].append("CT")
        cells["case_id"].append(f"e2e_{i:05d}")
        cells["question"].append(_text(words, int(shapes["question_tokens"][i]), tokenizer, rng) + "?")
        cells["answer"].append(_text(words, int(shapes["answer_tokens"][i]), tokenizer, rng) + ".")
        sizes.append((h, w))
    features = datasets.Features({"image_id": datasets.Image(), "mode": datasets.Value("string"),
                                  "case_id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    datasets.Dataset.from_dict(cells, features=features).to_parquet(str(path))
    return {"image_hw": sizes, "question_tokens": shapes["question_tokens"].tolist(),
            "answer_tokens": shapes["answer_tokens"].tolist()}


def sample_lengths(path: Path, transform) -> Dict[str, List[int]]:
    """Tokens and image tokens of every row after the plugin's transform (the lengths the recipe trains on)."""
    import pyarrow.parquet as pq
    from PIL import Image
    from torchtune.data import Message

    lengths, image_tokens = [], []
    for row in pq.read_table(path).to_pylist():
        image = Image.open(io.BytesIO(row["image_id"]["bytes"]))
        user = [{"type": "image", "content": image}, {"type": "text", "content": row["question"]}]
        messages = [Message("user", user), Message("assistant", row["answer"])]
        out = transform({"messages": messages})
        lengths.append(len(out["tokens"]))
        image_tokens.append(sum(1 for t in out["tokens"] if t in (10, 12, 13)))  # [IMG], [IMG_BREAK], [IMG_END]
    return {"sample_lengths": lengths, "image_tokens": image_tokens}


# ------------------------------------------------------------------------------------------------ the run


def steps_per_epoch(mode: str, data: Path, transform, grad_accum: int = 2) -> int:
    """Optimizer steps in one epoch of ``data``, as the recipe counts them (full batches; packs when packed)."""
    from torchtune_mistral3.datasets import medpix_dataset

    if mode == "packed":
        packs = len(medpix_dataset(transform, source="parquet", data_files=str(data), split_by_case=False,
                                   packed=True))
        return packs // PACKED_BATCH // grad_accum
    rows = len(medpix_dataset(transform, source="parquet", data_files=str(data), split_by_case=False))
    return rows // 4 // grad_accum


def tune_command(mode: str, args, ckpt: Path, data: Path, val: Path, output_dir: Path, epochs: int,
                 per_epoch: int) -> List[str]:
    """The stock CLI and its overrides for one mode."""
    overrides = [
        f"output_dir={output_dir}", f"checkpoint_dir={ckpt}",
        "dataset.source=parquet", f"dataset.data_files={data}", "dataset.split_by_case=False",
        "dataset_val.source=parquet", f"dataset_val.data_files={val}", "dataset_val.split=train",
        "dataset_val.split_by_case=False",
        "run_val_every_n_steps=null", f"epochs={epochs}", f"max_steps_per_epoch={per_epoch}",
        "metric_logger._component_=torchtune.training.metric_logging.DiskLogger", "log_every_n_steps=1",
        f"num_workers={args.num_workers}", "save_every_n_steps=null",
    ]
    if args.smoke:  # CPU: the tiny model, eager, fp32, small images and sequences
        overrides += ["device=cpu", "compile=False", "dtype=fp32", "log_peak_memory_stats=False",
                      "tokenizer.max_seq_len=512", "tokenizer.max_image_size=112",
                      "enable_activation_checkpointing=False"]
    overrides += MODES[mode]
    if args.profile:  # torch profiler over --profile steps after warm-up (trace_summary.py reads its traces)
        overrides += ["profiler.enabled=True", f"profiler.output_dir={output_dir.parent / f'{mode}_profile'}",
                      f"profiler.wait_steps={args.warmup_steps}", "profiler.warmup_steps=2",
                      f"profiler.active_steps={args.profile}", "profiler.num_cycles=1", "profiler.cpu=True",
                      "profiler.cuda=True", "profiler.profile_memory=False", "profiler.with_stack=False",
                      "profiler.record_shapes=False", "profiler.with_flops=False"]
    overrides += args.override
    return [sys.executable, "-m", "torchtune._cli.tune", "run", "full_finetune_distributed", "--config", CONFIG,
            *overrides]


def read_log(output_dir: Path) -> List[Dict[str, float]]:
    """The DiskLogger's steps: one dict of the logged scalars per step, in step order."""
    (log,) = (output_dir / "logs").glob("log_*.txt")
    steps: Dict[int, Dict[str, float]] = {}
    for line in log.read_text().splitlines():
        m = re.match(r"Step (\d+) \| (.*)", line)
        if m:
            fields = dict(kv.split(":", 1) for kv in m[2].split())
            steps.setdefault(int(m[1]), {}).update({k: float(v) for k, v in fields.items()})
    return [dict(steps[k], step=k) for k in sorted(steps)]


def summarize(steps: List[Dict[str, float]], launched: float, warmup: int, flops_per_sample: float,
              peak_tflops: float) -> Dict[str, Any]:
    """The run's figures from its per-step log (see the module docstring)."""
    if len(steps) <= warmup:
        raise RuntimeError(f"the run logged {len(steps)} steps, not more than --warmup-steps={warmup}")
    after = steps[warmup:]
    step_s = sum(s["step_time_s"] for s in after)
    real = sum(s["real_tokens"] for s in after)
    samples = sum(s["samples"] for s in after)
    steady = statistics.median(s["step_time_s"] for s in after)
    # steady from the first step after which no step is a warm-up-sized outlier
    slow = [i for i, s in enumerate(steps) if s["step_time_s"] > STEADY_FACTOR * steady]
    steady_from = slow[-1] + 1 if slow else 0
    out = {
        "steps_logged": len(steps),
        "warmup_steps": warmup,
        "time_to_first_step_s": steps[0]["unix_time_s"] - launched,
        "steady_from_step": steady_from + 1 if steady_from < len(steps) else None,
        "time_to_steady_state_s": (steps[steady_from - 1]["unix_time_s"] - launched) if steady_from else
        steps[0]["unix_time_s"] - launched - steps[0]["step_time_s"],
        "steady_step_s": steady,
        "mean_step_s_after_warmup": step_s / len(after),
        "samples_per_step": samples / len(after),
        "real_tokens_per_step": real / len(after),
        "real_tokens_per_s_per_gpu": real / step_s,
        "padding_fraction": statistics.mean(s["padding_fraction"] for s in after),
        "mfu_real_tokens": samples * flops_per_sample / step_s / (peak_tflops * 1e12) if peak_tflops else None,
        "compiled_graphs_total": int(steps[-1]["compiled_graphs"]),
        "recompiles_after_warmup": int(steps[-1]["compiled_graphs"] - steps[warmup - 1]["compiled_graphs"])
        if warmup else int(steps[-1]["compiled_graphs"]),
        "data_wait_share": sum(s["data_wait_s"] for s in after) / step_s,
        "slow_steps_after_warmup": [s["step"] for s in after if s["step_time_s"] > STEADY_FACTOR * steady],
        "loss_first_last": [steps[0]["loss"], steps[-1]["loss"]],
    }
    peaks = [s[k] for s in steps for k in ("peak_memory_active", "peak_memory_alloc", "peak_memory_reserved") if k in s]
    out["peak_memory_gib"] = {k: max(s[k] for s in steps) for k in ("peak_memory_active", "peak_memory_alloc",
                                                                     "peak_memory_reserved") if k in steps[0]}
    out["peak_memory_gib"] = out["peak_memory_gib"] if peaks else None
    return out


def run_mode(mode: str, args, ckpt: Path, data: Path, val: Path, work: Path, per_epoch: int) -> Dict[str, Any]:
    """Launch the stock command for ``mode``; return its log's steps, its wall time, its command, the steps run.

    ``epochs`` x ``max_steps_per_epoch`` is the least product of at least ``--steps`` that the data's
    ``per_epoch`` steps allow (a few more steps than asked where they do not divide).
    """
    output_dir = work / f"run_{mode}_{time.strftime('%Y%m%d_%H%M%S')}"  # a fresh one: one log per run
    if per_epoch < 1:
        raise ValueError(f"{data} gives no full {mode} step: more --rows")
    epochs = math.ceil(args.steps / per_epoch)
    per_epoch = math.ceil(args.steps / epochs)
    cmd = tune_command(mode, args, ckpt, data, val, output_dir, epochs, per_epoch)
    env = dict(os.environ, TQDM_DISABLE="1")
    launched = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - launched
    # the run's own output (its log lines, TORCH_LOGS=recompiles if set), kept beside the runs
    (work / f"{mode}.log").write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    steps = read_log(output_dir)
    # a 3B training state and checkpoint take ~17 GB: the next mode (or the peer) needs the disk
    for sub in output_dir.iterdir():
        if sub.is_dir() and sub.name != "logs":
            shutil.rmtree(sub)
    return {"command": " ".join(cmd[2:]), "launched": launched, "wall_s": wall, "steps": steps,
            "steps_run": epochs * per_epoch}


# ------------------------------------------------------------------------------------------------ FLOPs, plan


def flops_per_sample(ckpt: Path, lengths: List[int], image_tokens: List[int]) -> float:
    """Mean model FLOPs of one workload sample (the planner's ``model_flops_per_step`` on that sample alone)."""
    from torchtune_mistral3.planning._memory_plan import Layout, build_meta_model, model_dims
    from torchtune_mistral3.planning._step_plan import MicroBatch, model_flops_per_step

    dims = model_dims(build_meta_model(str(ckpt)))
    total = 0.0
    for n, img in zip(lengths, image_tokens):
        # image positions rows x (cols + 1); its patches ~ 4 x the merged tokens (rows x cols)
        merged = img - round(math.sqrt(img))
        mb = MicroBatch(1, n, (4 * merged,), merged, packed=False)
        total += model_flops_per_step(dims, Layout(seq_len=n, batch_size=1), mb, 1, trains_projector=True)
    return total / len(lengths)


def plan_prediction(mode: str, ckpt: Path, lengths_file: Path, gpu: str, smoke: bool) -> Dict[str, Any]:
    """The planner's step time for the run's config, overrides and sample lengths."""
    from torchtune_mistral3.planning import PLAN_KEY_FILES, load_config, plan_config

    overrides = [f"checkpoint_dir={ckpt}", f"plan.sample_lengths={lengths_file}", f"plan.gpu={gpu}", *MODES[mode]]
    if smoke:
        overrides += ["compile=False", "tokenizer.max_seq_len=512", "tokenizer.max_image_size=112"]
    plan, options = plan_config(load_config(CONFIG, overrides, key_files=PLAN_KEY_FILES))  # plan.* keys
    step = options["step"]
    return {"step_s": step.step_s, "real_tokens_per_s_per_gpu": step.real_tokens_per_s_per_gpu,
            "padded_seq_len": step.padded_seq_len, "padding": step.padding,
            "peak_memory_gib": max(r.peak for r in plan.ranks) / GIB}


# ------------------------------------------------------------------------------------------------ the peer


def _peer_batches(data: Path, tekken: str, max_image_size: int, max_seq_len: int, batch: int, seed: int):
    """The rows as transformers' processing makes them: shuffled, ``batch`` per batch, padded to the longest."""
    import pyarrow.parquet as pq
    from PIL import Image
    from transformers.integrations.mistral import convert_tekken_tokenizer
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tokenizer = convert_tekken_tokenizer(tekken)
    # transformers' slow (PIL) Pixtral image processor: its fast one needs torchvision, which the GPU image may
    # lack; sizes rounded up to 28 px (patch x merge), as the plugin's resize and the model's merge use them
    processor = PixtralImageProcessorPil(size={"longest_edge": max_image_size}, patch_size={"height": 28, "width": 28})
    rows = pq.read_table(data).to_pylist()
    order = np.random.default_rng(seed).permutation(len(rows))
    pad = tokenizer.convert_tokens_to_ids("<pad>")
    inst_end = tokenizer.convert_tokens_to_ids("[/INST]")

    def make(chunk):
        images = [Image.open(io.BytesIO(rows[i]["image_id"]["bytes"])).convert("RGB") for i in chunk]
        texts = [f"<s>[INST][IMG]{rows[i]['question']}[/INST]{rows[i]['answer']}</s>" for i in chunk]
        out = dict(processor(images, return_tensors="pt"))
        expanded = []  # PixtralProcessor's expansion of [IMG]: rows x ([IMG] x cols + [IMG_BREAK]), last -> [IMG_END]
        for text, (h, w) in zip(texts, out["image_sizes"].tolist()):
            layout = ("[IMG]" * (w // 28) + "[IMG_BREAK]") * (h // 28)
            layout = layout[: -len("[IMG_BREAK]")] + "[IMG_END]"
            expanded.append(text.replace("[IMG]", layout, 1))
        out.update(tokenizer(expanded, padding=True, return_tensors="pt", add_special_tokens=False))
        ids = out["input_ids"][:, :max_seq_len]
        labels = ids.clone()
        for r in range(len(ids)):  # the answer and </s> only
            end = int((ids[r] == inst_end).nonzero()[0]) + 1
            labels[r, :end] = -100
        labels[ids == pad] = -100
        labels[out["attention_mask"][:, :max_seq_len] == 0] = -100
        return {"input_ids": ids, "attention_mask": out["attention_mask"][:, :max_seq_len], "labels": labels,
                "pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}

    for start in range(0, len(order) - batch + 1, batch):
        yield make(order[start:start + batch])


def run_peer(ckpt: Path, data: Path, device: str, steps: int, warmup: int, max_image_size: int, max_seq_len: int,
             grad_accum: int = 2, batch: int = 4, checkpointing: bool = True) -> Dict[str, Any]:
    """transformers' model, its processing, a plain loop (see the module docstring)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    cfg = json.loads((ckpt / "config.json").read_text())
    config = Mistral3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype",
                                                                         "quantization_config")})
    with torch.device(device):
        model = Mistral3ForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.model.vision_tower.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device == "cuda")
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    batches = _peer_batches(data, str(ckpt / "tekken.json"), max_image_size, max_seq_len, batch, seed=0)
    times, tokens, waits, losses = [], [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        micro = [next(batches) for _ in range(grad_accum)]
        wait = time.perf_counter() - start
        n_labels = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
        total = 0.0
        for m in micro:
            m = {k: v.to(device) for k, v in m.items()}
            # bf16 autocast on the GPU; fp32 on CPU (the smoke run, as the plugin's smoke run uses dtype=fp32)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda):
                out = model(**m, use_cache=False)
            # transformers' loss is the token mean of this micro-batch: weight it to the step's token mean
            share = out.loss * int((m["labels"][:, 1:] != -100).sum()) / n_labels
            share.backward()
            total += float(share.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        waits.append(wait)
        tokens.append(sum(int(m["attention_mask"].sum()) for m in micro))
        losses.append(total)
    after = slice(warmup, None)
    return {
        "steps": steps, "warmup_steps": warmup,
        "steady_step_s": statistics.median(times[after]),
        "real_tokens_per_s_per_gpu": sum(tokens[after]) / sum(times[after]),
        "data_share": sum(waits[after]) / sum(times[after]),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "real_tokens_per_sample": sum(tokens) / (steps * grad_accum * batch),
        "step_s": times, "real_tokens": tokens, "losses": losses,
        "gradient_checkpointing": checkpointing,
    }


def run_fixed_shape(ckpt: Path, device: str, seq: int, batch: int, image_tokens: float, steps: int,
                    warmup: int) -> Dict[str, Any]:
    """``bench/step_speed.py``'s plugin step (compiled, AC, one-chunk loss) at one fixed shape of this model."""
    from _slice import make_batch
    from step_speed import run_variant

    cfg = json.loads((ckpt / "config.json").read_text())
    side = max(1, round(math.sqrt(image_tokens)))
    px = side * 28
    while side * (side + 1) + 48 + 8 > seq and side > 1:  # the image must leave room for the question and answer
        side -= 1
        px = side * 28
    b = make_batch(cfg, batch, seq, px, device)
    r = run_variant("plugin_compile_ac_c1", cfg, b, device, steps, warmup, profile=False)
    r["seq_len"], r["batch_size"], r["image_px"] = seq, batch, px
    r["tokens_per_s"] = batch * seq / r["median_step_s"]
    return r


# ------------------------------------------------------------------------------------------------ main


def _write(result: Dict[str, Any], path: Optional[str]) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=float)


def print_table(result: Dict[str, Any]) -> None:
    """The summary table and the ratios."""
    print(f"\n{result['device']}  torch {result['torch']}  model {result['model']}  rows {result['rows']}  "
          f"mean {result['workload']['mean_tokens']:.0f} tokens/sample")
    head = (f"{'mode':8} {'1st step s':>10} {'steady at s':>11} {'step s':>7} {'plan s':>7} {'real tok/s':>10} "
            f"{'MFU real':>8} {'recomp':>6} {'wait %':>6} {'pad %':>6} {'peak GiB':>8}")
    print(head)
    for mode, r in result["modes"].items():
        s = r.get("summary")
        if s is None:
            print(f"{mode:8} {r.get('error', '')[:100]}")
            continue
        mfu = f"{s['mfu_real_tokens']:.1%}" if s["mfu_real_tokens"] is not None else "-"
        peak = max(s["peak_memory_gib"].values()) if s["peak_memory_gib"] else float("nan")
        plan = r.get("plan", {}).get("step_s", float("nan"))
        print(f"{mode:8} {s['time_to_first_step_s']:10.1f} {s['time_to_steady_state_s']:11.1f} "
              f"{s['steady_step_s']:7.3f} {plan:7.3f} {s['real_tokens_per_s_per_gpu']:10.0f} {mfu:>8} "
              f"{s['recompiles_after_warmup']:6d} {s['data_wait_share']:6.1%} {s['padding_fraction']:6.1%} {peak:8.2f}")
    peer = result.get("peer")
    if peer and "real_tokens_per_s_per_gpu" in peer:
        print(f"{'peer':8} transformers: steady step {peer['steady_step_s']:.3f} s, "
              f"{peer['real_tokens_per_s_per_gpu']:.0f} real tok/s ({peer['steps']} steps, "
              f"{peer['warmup_steps']} warm-up)")
    for name, value in result.get("ratios", {}).items():
        print(f"  {name}: {value:.3f}")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON result file")
    ap.add_argument("--steps", type=int, default=220, help="optimizer steps per mode")
    ap.add_argument("--warmup-steps", type=int, default=10, help="steps left out of the steady figures")
    ap.add_argument("--modes", default="padded,packed")
    ap.add_argument("--rows", type=int, default=1000, help="workload rows (at least 500 outside --smoke)")
    ap.add_argument("--size", choices=("3b", "128b"), default="3b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's; 128b: give N)")
    ap.add_argument("--num-workers", type=int, default=4, help="the run's num_workers")
    ap.add_argument("--peer", action="store_true", help="also train transformers' model on the same rows")
    ap.add_argument("--peer-steps", type=int, default=40)
    ap.add_argument("--peer-warmup", type=int, default=5)
    ap.add_argument("--fixed-shape", action="store_true", help="also time bench/step_speed.py's step at the shapes")
    ap.add_argument("--fixed-steps", type=int, default=10)
    ap.add_argument("--with-result", action="append", default=[],
                    help="an earlier --out JSON of the same workload: its modes join the fixed-shape step and ratios")
    ap.add_argument("--workdir", default=None, help="checkpoint, data and runs (default: a new temporary folder)")
    ap.add_argument("--profile", type=int, default=0,
                    help="profile this many steps after --warmup-steps (+2) with torch.profiler; the traces go to "
                         "<workdir>/<mode>_profile and bench/trace_summary.py prints where their time went")
    ap.add_argument("--override", action="append", default=[], help="an extra key=value for the runs (repeatable)")
    ap.add_argument("--smoke", action="store_true", help="CPU: the demo's tiny model, small images, eager")
    args = ap.parse_args(argv)
    if not args.smoke and args.rows < 500:
        ap.error("--rows must be at least 500 (the workload of issue 24); --smoke for a small CPU test")
    if args.size == "128b" and not args.layers:
        ap.error("--size 128b needs --layers N (the 128B widths at a few layers)")

    from torchtune_mistral3.models.mistral3 import mistral3_transform

    device = "cpu" if args.smoke else "cuda"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="e2e_"))
    work.mkdir(parents=True, exist_ok=True)
    gpu = "h200" if device == "cuda" and "H200" in torch.cuda.get_device_name() else "h100"
    from torchtune_mistral3.planning._step_plan import PEAK_TFLOPS

    result: Dict[str, Any] = {
        "command": "python bench/e2e.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": platform.node(), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "config": CONFIG, "model": "demo (tiny)" if args.smoke else
        f"{args.size}" + (f" x {args.layers} layers" if args.layers else ""), "rows": args.rows, "modes": {},
    }
    t = time.time()
    ckpt = write_checkpoint(work / f"ckpt_{'smoke' if args.smoke else args.size}_{args.layers or 'all'}",
                            args.size, args.layers, args.smoke)
    result["checkpoint_write_s"] = time.time() - t
    max_seq_len, max_image_size = (512, 112) if args.smoke else (2048, 1024)
    transform = mistral3_transform(str(ckpt / "tekken.json"), max_seq_len=None, max_image_size=max_image_size)
    run_transform = mistral3_transform(str(ckpt / "tekken.json"), max_seq_len=max_seq_len,
                                       max_image_size=max_image_size)
    t = time.time()
    data, val = work / "medpix_e2e.parquet", work / "medpix_e2e_val.parquet"
    drawn = build_workload(data, args.rows, transform, seed=0)
    build_workload(val, 16, transform, seed=99)
    measured = sample_lengths(data, transform)
    lengths_file = work / "sample_lengths.json"
    lengths_file.write_text(json.dumps({"sample_lengths": measured["sample_lengths"]}))
    lengths = np.array(measured["sample_lengths"])
    result["workload"] = {
        "build_s": time.time() - t, "file": str(data), "sample_lengths_file": str(lengths_file),
        "mean_tokens": float(lengths.mean()), "median_tokens": float(np.median(lengths)),
        "p95_tokens": float(np.percentile(lengths, 95)), "max_tokens": int(lengths.max()),
        "mean_image_tokens": float(np.mean(measured["image_tokens"])),
        "mean_answer_tokens_drawn": float(np.mean(drawn["answer_tokens"])),
        "image_long_side_px": [min(max(hw) for hw in drawn["image_hw"]), max(max(hw) for hw in drawn["image_hw"])],
        "truncated_rows": int((lengths > max_seq_len).sum()),
    }
    _write(result, args.out)
    per_sample = flops_per_sample(ckpt, measured["sample_lengths"], measured["image_tokens"])
    peak = PEAK_TFLOPS[gpu] if device == "cuda" else 0.0
    for mode in [m for m in args.modes.split(",") if m]:
        if mode not in MODES:
            ap.error(f"--modes: {mode} is not one of {sorted(MODES)}")
        entry: Dict[str, Any] = {}
        try:
            run = run_mode(mode, args, ckpt, data, val, work, steps_per_epoch(mode, data, run_transform))
            entry = {"command": run["command"], "wall_s": run["wall_s"], "steps_run": run["steps_run"],
                     "steps": run["steps"]}
            entry["summary"] = summarize(run["steps"], run["launched"], args.warmup_steps, per_sample, peak)
            entry["plan"] = plan_prediction(mode, ckpt, lengths_file, gpu, args.smoke)
            if args.profile:
                import trace_summary

                traces = sorted(str(p) for p in (work / f"{mode}_profile").rglob("*.pt.trace.json*"))
                print(f"--- {mode}: where the profiled steps' time went")
                trace_summary.main(traces)
        except Exception as e:  # noqa: BLE001 - a failing mode is reported, the others still run
            entry["error"] = f"{type(e).__name__}: {str(e)[-4000:]}"
            print(entry["error"], file=sys.stderr)
        result["modes"][mode] = entry
        _write(result, args.out)
    if args.peer:
        try:
            result["peer"] = run_peer(ckpt, data, device, args.peer_steps, args.peer_warmup, max_image_size,
                                      max_seq_len, checkpointing=not args.smoke)
        except Exception as e:  # noqa: BLE001
            result["peer"] = {"error": f"{type(e).__name__}: {str(e)[-2000:]}"}
            print(result["peer"]["error"], file=sys.stderr)
        _write(result, args.out)
    for earlier in args.with_result:  # modes measured by an earlier call (a call is limited to 10 minutes)
        for mode, entry in json.loads(Path(earlier).read_text())["modes"].items():
            result["modes"].setdefault(mode, entry)
    if args.fixed_shape:
        import gc

        gc.collect()  # the peer's model and optimizer states leave the GPU first
        if device == "cuda":
            torch.cuda.empty_cache()
        result["fixed_shape"] = {}
        for mode, entry in result["modes"].items():
            if "summary" not in entry:
                continue
            s = entry["summary"]
            if mode == "padded":
                seq = round(s["real_tokens_per_step"] / (1 - s["padding_fraction"]) / s["samples_per_step"])
                batch = 4
            else:
                seq, batch = max_seq_len, PACKED_BATCH
            try:
                result["fixed_shape"][mode] = run_fixed_shape(ckpt, device, seq, batch,
                                                              result["workload"]["mean_image_tokens"],
                                                              args.fixed_steps, 3)
            except Exception as e:  # noqa: BLE001
                result["fixed_shape"][mode] = {"error": f"{type(e).__name__}: {str(e)[-2000:]}"}
            _write(result, args.out)
    result["ratios"] = ratios(result)
    _write(result, args.out)
    print_table(result)
    return result


def ratios(result: Dict[str, Any]) -> Dict[str, float]:
    """packed / padded, plugin / peer, e2e step / fixed-shape step (per computed token), planner / measured."""
    out = {}
    s = {m: e["summary"] for m, e in result["modes"].items() if "summary" in e}
    if "padded" in s and "packed" in s:
        out["packed_over_padded_real_tokens_per_s"] = (s["packed"]["real_tokens_per_s_per_gpu"]
                                                       / s["padded"]["real_tokens_per_s_per_gpu"])
    peer = result.get("peer") or {}
    if "real_tokens_per_sample" in peer:  # the same rows, tokenized by each side
        out["peer_over_plugin_tokens_per_sample"] = peer["real_tokens_per_sample"] / result["workload"]["mean_tokens"]
    for m in s:
        if "real_tokens_per_s_per_gpu" in peer:
            peer_rate = peer["real_tokens_per_s_per_gpu"]
            out[f"{m}_over_peer_real_tokens_per_s"] = s[m]["real_tokens_per_s_per_gpu"] / peer_rate
        plan = result["modes"][m].get("plan")
        if plan and result["device"] != "cpu":  # the plan is of the GPU
            out[f"{m}_plan_over_measured_step"] = plan["step_s"] / s[m]["steady_step_s"]
        fixed = (result.get("fixed_shape") or {}).get(m, {})
        if "median_step_s" in fixed:
            computed = s[m]["real_tokens_per_step"] / (1 - s[m]["padding_fraction"])
            fixed_per_token = fixed["median_step_s"] / (fixed["seq_len"] * fixed["batch_size"])
            # the e2e step spends 2 micro-batches: compare seconds per computed token
            out[f"{m}_e2e_over_fixed_shape_s_per_token"] = s[m]["steady_step_s"] / computed / fixed_per_token
    return out


if __name__ == "__main__":
    main()
