"""MedPix evaluation: answer scorers and the evaluation run behind the ``medpix_eval`` recipe."""

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

__all__ = [
    "METRICS",
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
