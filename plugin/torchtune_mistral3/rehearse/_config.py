"""The config a rehearsal runs: the user's config and overrides, minus what cannot or must not run on one CPU."""

import json
from pathlib import Path
from typing import List, Tuple

from omegaconf import DictConfig, OmegaConf

from torchtune_mistral3.training._parallel_dims import ParallelDims

# What the rehearsal changes in every config, and why (printed with the report).
CHANGES: List[Tuple[str, str]] = [
    ("device=cpu", "no GPU: tensors are fake CPU tensors of the real shapes; the fake backend stands in for NCCL"),
    ("compile=False", "compiled blocks are not rehearsed (inductor does not run on fake tensors here); eager "
                      "blocks have the same parameters, shardings and collectives, more activation memory"),
    ("dataset=<synthetic rows>", "the hub data set is not downloaded: rows in its schema, one image of "
                                 "rehearse.image_px pixels each, through the config's own transform, packing and "
                                 "collate"),
    ("dataset_val=null", "one training step only: validation is not rehearsed"),
    ("metric_logger=DiskLogger", "nothing is logged outside the rehearsal's temporary directory"),
    ("output_dir=<temporary>", "the save is planned (files, keys, gathers), not written"),
    ("prepare_checkpoint=null", "the checkpoint must exist: only its headers, index, config and tokenizer are read"),
    ("optimizer states allocated before the step", "the step rehearsed is a steady-state one: Adam's moments exist "
                                                   "during its forward and backward, as in every step after the first"),
]


def write_rows(directory: Path, rows: int, image_px: int, question_words: int, answer_words: int) -> Path:
    """Write ``rows`` MedPix-schema rows (JSON lines) and their image into ``directory``.

    Args:
        directory (Path): where to write ``rows.jsonl`` and ``image.png``.
        rows (int): number of rows.
        image_px (int): the square image's edge.
        question_words (int): words per question.
        answer_words (int): words per answer.

    Returns:
        Path: the JSON lines file.
    """
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (image_px, image_px, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(directory / "image.png")
    words = "the lesion shows contrast enhancement in the left lobe with mild edema".split()
    path = directory / "rows.jsonl"
    with open(path, "w") as f:
        for i in range(rows):
            q = " ".join(words[(i + j) % len(words)] for j in range(question_words))
            a = " ".join(words[(i + 2 * j) % len(words)] for j in range(answer_words))
            row = {"image_id": "image.png", "question": q + "?", "answer": a + ".", "mode": "CT",
                   "case_id": f"case_{i}"}
            f.write(json.dumps(row) + "\n")
    return path


def rehearsal_config(cfg: DictConfig, workdir: Path, world_size: int) -> DictConfig:
    """Return ``cfg`` with the :data:`CHANGES` applied; rows and outputs go under ``workdir``.

    ``rehearse.*`` keys (removed from the result): ``image_px`` (default 532, the planner's MedPix image),
    ``question_words`` (default 60) and ``answer_words`` (default 40), about the planner's 575 tokens per sample.

    Args:
        cfg (DictConfig): the user's config with overrides applied.
        workdir (Path): a temporary directory.
        world_size (int): the job's world size.

    Returns:
        DictConfig: the config the recipe gets.
    """
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    opts = cfg.pop("rehearse", None) or {}
    dp = ParallelDims.from_config(cfg, world_size).dp
    packed = bool((cfg.get("dataset", None) or {}).get("packed", False))
    samples = int(cfg.get("batch_size", 1)) * int(cfg.get("gradient_accumulation_steps", 1)) * dp
    rows = write_rows(workdir / "rows", samples * (6 if packed else 1) + 8, int(opts.get("image_px", 532)),
                      int(opts.get("question_words", 60)), int(opts.get("answer_words", 40)))
    cfg.output_dir = str(workdir / "output")
    cfg.device = "cpu"
    cfg.compile = False
    cfg.dataset = {
        "_component_": "torchtune_mistral3.datasets.medpix_dataset",
        "source": "json",
        "data_files": str(rows),
        "image_dir": str(rows.parent),
        "split": "train",
        "split_by_case": False,
        "packed": packed,
    }
    cfg.dataset_val = None
    cfg.run_val_every_n_steps = None
    cfg.shuffle = False
    cfg.epochs = 1
    cfg.max_steps_per_epoch = 1
    cfg.resume_from_checkpoint = False
    cfg.assume_shared_output_dir = True
    cfg.log_peak_memory_stats = False
    cfg.prepare_checkpoint = None
    cfg.metric_logger = {"_component_": "torchtune.training.metric_logging.DiskLogger",
                         "log_dir": str(workdir / "logs")}
    if cfg.get("profiler", None) is not None:
        cfg.profiler.enabled = False
    return cfg
