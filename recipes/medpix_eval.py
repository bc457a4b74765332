"""MedPix evaluation of a Mistral 3 checkpoint (a recipe of torchtune-mistral3, listed by ``tune ls``).

Validation loss and perplexity over the answer tokens of a split (as the training recipe's validation computes
them), then greedy (or sampled) answers to the first ``max_rows`` rows, generated in batches with a KV cache and
scored with normalised exact match, token F1, token recall, BLEU-1, ROUGE-L and closed yes/no accuracy, overall
and by ``mode``. Writes ``<output_dir>/medpix_eval.json`` and ``medpix_eval_predictions.jsonl`` (every prediction)
and prints the table. Several processes run tensor parallel (gloo on CPU, NCCL on GPU).

    tune run medpix_eval --config mistral3p5_medpix_demo_eval
    tune run --nproc_per_node 8 medpix_eval --config mistral3p5_medpix_eval checkpoint_dir=<output_dir>/epoch_0
"""

import sys

from omegaconf import DictConfig
from torchtune import config
from torchtune_mistral3._entry import run_recipe
from torchtune_mistral3.eval import MedPixEvalRecipe


@config.parse
def main(cfg: DictConfig) -> None:
    """Entry point.

    Args:
        cfg (DictConfig): the parsed config (YAML plus command-line overrides).
    """
    return run_recipe(cfg, MedPixEvalRecipe, lambda recipe: recipe.evaluate(cfg))


if __name__ == "__main__":
    sys.exit(main())
