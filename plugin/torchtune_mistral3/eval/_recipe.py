"""The ``medpix_eval`` recipe: validation loss and perplexity, then generated answers scored, on a MedPix split."""

import json
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig
from torch.utils.data import DataLoader
from torchtune import config, utils

from ..data import padded_collate_mistral3
from ..generation import Mistral3GenerationRecipe
from ..training._config_keys import check_config_values
from ._evaluate import format_table, generate_answers, medpix_prompts, score_predictions, validation_loss

log = utils.get_logger("INFO")

RESULTS_FILE = "medpix_eval.json"
PREDICTIONS_FILE = "medpix_eval_predictions.jsonl"
EVAL_COUNTS = ("batch_size", "max_val_steps", "batch_size_generate", "max_rows", "max_new_tokens")


class MedPixEvalRecipe(Mistral3GenerationRecipe):
    """Evaluate a Mistral 3 checkpoint on a MedPix split (one process, or tensor parallel over all processes).

    Keys besides those of the generate recipe (model, tokenizer, checkpointer, greedy/temperature/top_k, device,
    dtype, seed, tensor_parallel_plan): ``dataset`` (a MedPix dataset component, e.g. the validation split),
    ``batch_size`` (loss batches), ``max_val_steps`` (loss batches at most; null = all rows),
    ``batch_size_generate``, ``max_rows`` (answer the first N rows of the split; null = all), ``max_new_tokens``,
    ``output_dir`` (where ``medpix_eval.json`` and ``medpix_eval_predictions.jsonl`` are written).

    Args:
        cfg (DictConfig): the parsed config.
    """

    def __init__(self, cfg: DictConfig) -> None:
        check_config_values(cfg, counts=EVAL_COUNTS)  # counts, before anything is built
        super().__init__(cfg)

    def evaluate(self, cfg: DictConfig) -> Dict[str, Any]:
        """Run the evaluation, print the table, write the JSON and JSONL files (rank 0).

        Args:
            cfg (DictConfig): the parsed config.

        Returns:
            Dict[str, Any]: the results written to ``medpix_eval.json``.
        """
        dataset = config.instantiate(cfg.dataset, self.transform)
        if len(dataset) == 0:  # else the loss over no tokens reads 0.0 and the perplexity 1.0
            raise ValueError(
                f"dataset ({cfg.dataset.get('_component_')}, split={cfg.dataset.get('split', None)!r}) has 0 rows "
                "to evaluate (after skipped rows): point dataset at a split with rows"
            )
        loader = DataLoader(
            dataset,
            batch_size=int(cfg.get("batch_size", 1)),
            shuffle=False,
            collate_fn=partial(padded_collate_mistral3, padding_idx=self.transform.pad_id),
        )
        max_steps = cfg.get("max_val_steps", None)
        batches = (b for i, b in enumerate(loader) if max_steps is None or i < int(max_steps))
        t0 = time.perf_counter()
        loss = validation_loss(self.model, batches, self._device)
        if loss["label_tokens"] == 0:
            raise ValueError(
                f"The {len(dataset)} rows of dataset give no answer tokens to score (max_val_steps="
                f"{max_steps}): the answers are empty or cut off by tokenizer.max_seq_len"
            )
        utils.log_rank_zero(
            log,
            f"Validation loss {loss['val_loss']:.4f} (perplexity {loss['perplexity']:.2f}) over "
            f"{loss['label_tokens']} answer tokens in {time.perf_counter() - t0:.1f} s",
        )
        max_rows = cfg.get("max_rows", None)
        n = len(dataset) if max_rows is None else min(int(max_rows), len(dataset))
        prompts = medpix_prompts(dataset, range(n))
        t0 = time.perf_counter()
        answers = generate_answers(
            self.model,
            self.transform,
            prompts,
            batch_size=int(cfg.get("batch_size_generate", 8)),
            max_new_tokens=int(cfg.max_new_tokens),
            device=self._device,
            sampling=self._sampling,
        )
        seconds = time.perf_counter() - t0
        scores = score_predictions(prompts, answers)
        results = {
            **loss,
            "checkpoint_dir": str(cfg.checkpointer.checkpoint_dir),
            "rows": n,
            "generation_seconds": seconds,
            "overall": scores["overall"],
            "by_mode": scores["by_mode"],
        }
        if self._is_rank_zero:
            out = Path(cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
            with open(out / PREDICTIONS_FILE, "w") as f:
                for row in scores["rows"]:
                    f.write(json.dumps(row) + "\n")
            print(format_table(scores), flush=True)
            log.info(f"{n} answers in {seconds:.1f} s; results in {out / RESULTS_FILE}, {out / PREDICTIONS_FILE}")
        return results
