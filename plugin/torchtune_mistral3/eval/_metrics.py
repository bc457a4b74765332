"""Answer scorers for medical VQA: normalised exact match, token F1 / recall, BLEU-1, ROUGE-L, closed yes/no accuracy.

Every scorer compares one prediction with one reference after :func:`normalize_answer` (lower case, punctuation
and the articles a/an/the removed, whitespace collapsed, as SQuAD's scorer does) and splits on whitespace.

Two faults of LLaVA-Med's scorer are avoided on purpose: the yes/no of an answer is its *first word*, never a
substring (there, "normal" counted as "no"); and a closed question whose prediction gives no yes/no stays in the
denominator as wrong (there, it dropped out).
"""

import math
import re
import string
from collections import Counter
from typing import Dict, List, Optional

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
YES_NO = ("yes", "no")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation replaced by spaces, articles removed, whitespace collapsed.

    Args:
        text (str): an answer.

    Returns:
        str: the normalised answer.
    """
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_tokens(text: str) -> List[str]:
    """Words of the normalised answer.

    Args:
        text (str): an answer.

    Returns:
        List[str]: its tokens.
    """
    return normalize_answer(text).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised answers are equal, else 0.0.

    Args:
        prediction (str): the model's answer.
        reference (str): the reference answer.

    Returns:
        float: 0.0 or 1.0.
    """
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _overlap(prediction: List[str], reference: List[str]) -> int:
    """Tokens in common, counted with multiplicity (each reference token matches at most once)."""
    return sum((Counter(prediction) & Counter(reference)).values())


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (SQuAD's F1; MedGemma's and Med-PaLM M's "tokenized F1").

    Args:
        prediction (str): the model's answer.
        reference (str): the reference answer.

    Returns:
        float: F1 in [0, 1]; 1.0 when both are empty, 0.0 when one is.
    """
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = _overlap(pred, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_recall(prediction: str, reference: str) -> float:
    """Fraction of the reference's tokens found in the prediction (LLaVA-Med's open-question recall).

    Args:
        prediction (str): the model's answer.
        reference (str): the reference answer.

    Returns:
        float: recall in [0, 1]; 1.0 for an empty reference.
    """
    ref = answer_tokens(reference)
    if not ref:
        return 1.0
    return _overlap(answer_tokens(prediction), ref) / len(ref)


def bleu1(prediction: str, reference: str) -> float:
    """Sentence BLEU with unigrams only: clipped unigram precision times the brevity penalty.

    ``BP = exp(1 - r / c)`` when the prediction (``c`` tokens) is shorter than the reference (``r``), else 1.
    Equals ``nltk.translate.bleu_score.sentence_bleu([ref], pred, weights=(1,))`` on the same tokens.

    Args:
        prediction (str): the model's answer.
        reference (str): the reference answer.

    Returns:
        float: BLEU-1 in [0, 1]; 0.0 for an empty prediction.
    """
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return 0.0
    precision = _overlap(pred, ref) / len(pred)
    brevity = 1.0 if len(pred) >= len(ref) else math.exp(1 - len(ref) / len(pred))
    return precision * brevity


def _lcs_length(a: List[str], b: List[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row kept)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: ``2PR / (P + R)`` with ``P = LCS / |prediction|``, ``R = LCS / |reference|``.

    Args:
        prediction (str): the model's answer.
        reference (str): the reference answer.

    Returns:
        float: ROUGE-L F1 in [0, 1]; 0.0 if either is empty.
    """
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return 0.0
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def yes_no(text: str) -> Optional[str]:
    """``yes`` or ``no`` when the normalised answer starts with that word, else None ("normal" is not "no").

    Args:
        text (str): an answer.

    Returns:
        Optional[str]: "yes", "no" or None.
    """
    tokens = answer_tokens(text)
    return tokens[0] if tokens and tokens[0] in YES_NO else None


def score_answer(prediction: str, reference: str) -> Dict[str, Optional[float]]:
    """All scores of one prediction.

    Args:
        prediction (str): the model's answer.
        reference (str): the reference answer.

    Returns:
        Dict[str, Optional[float]]: ``exact_match``, ``token_f1``, ``token_recall``, ``bleu1``, ``rouge_l`` and
        ``closed_accuracy`` (1.0 / 0.0 when the reference starts with yes or no, a prediction without a yes/no
        counting as wrong; None for open questions).
    """
    closed = yes_no(reference)
    return {
        "exact_match": exact_match(prediction, reference),
        "token_f1": token_f1(prediction, reference),
        "token_recall": token_recall(prediction, reference),
        "bleu1": bleu1(prediction, reference),
        "rouge_l": rouge_l(prediction, reference),
        "closed_accuracy": None if closed is None else float(yes_no(prediction) == closed),
    }


METRICS = ("exact_match", "token_f1", "token_recall", "bleu1", "rouge_l", "closed_accuracy")


def aggregate(rows: List[Dict[str, Optional[float]]]) -> Dict[str, Optional[float]]:
    """Mean of each score over the rows that have it, with the counts.

    Args:
        rows (List[Dict[str, Optional[float]]]): outputs of :func:`score_answer`.

    Returns:
        Dict[str, Optional[float]]: the mean of each metric (None where no row has it, e.g. no closed
        question), ``n`` (rows) and ``n_closed`` (rows with a yes/no reference).
    """
    out: Dict[str, Optional[float]] = {}
    for name in METRICS:
        values = [r[name] for r in rows if r[name] is not None]
        out[name] = sum(values) / len(values) if values else None
    out["n"] = len(rows)
    out["n_closed"] = sum(r["closed_accuracy"] is not None for r in rows)
    return out
