"""MedPix evaluation: answer scorers and the evaluation run behind the ``medpix_eval`` recipe."""

from ._evaluate import format_table, generate_answers, medpix_prompts, score_predictions, validation_loss
from ._metrics import (
    METRICS,
    aggregate,
    answer_tokens,
    bleu1,
    exact_match,
    normalize_answer,
    rouge_l,
    score_answer,
    token_f1,
    token_recall,
    yes_no,
)
from ._recipe import PREDICTIONS_FILE, RESULTS_FILE, MedPixEvalRecipe

__all__ = [
    "METRICS",
    "MedPixEvalRecipe",
    "PREDICTIONS_FILE",
    "RESULTS_FILE",
    "format_table",
    "generate_answers",
    "medpix_prompts",
    "score_predictions",
    "validation_loss",
    "aggregate",
    "answer_tokens",
    "bleu1",
    "exact_match",
    "normalize_answer",
    "rouge_l",
    "score_answer",
    "token_f1",
    "token_recall",
    "yes_no",
]
