"""The MedPix answer scorers against values worked out by hand and against rouge-score and nltk."""

import math

import pytest
from torchtune_mistral3.eval import (
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

# pred [left, kidney, lesion]; ref [lesion, in, left, kidney] ("the" dropped): 3 common tokens, LCS 2 ("left kidney")
PRED, REF = "Left kidney lesion.", "A lesion in the left kidney"

PAIRS = [
    (PRED, REF),
    ("It is the descending thoracic aorta.", "The descending aorta"),
    ("axial CT image of the chest", "This is an axial (transverse) CT image through the chest."),
    ("no no no", "No."),
    ("The shoulder joint", "The shoulder (glenohumeral joint)."),
    ("kidney", "liver"),
    ("a b a c b a d", "b a c a b d a a"),
]


def test_normalisation_drops_case_punctuation_and_articles():
    assert normalize_answer("  The Aorta,  (descending)! ") == "aorta descending"
    assert answer_tokens("An MRI of a knee") == ["mri", "of", "knee"]
    assert exact_match("The aorta.", "aorta") == 1.0 and exact_match("aorta", "the aortic arch") == 0.0


def test_hand_derived_values():
    assert token_recall(PRED, REF) == pytest.approx(3 / 4)
    assert token_f1(PRED, REF) == pytest.approx(2 * 1 * 0.75 / 1.75)  # P = 1, R = 3/4 -> 6/7
    assert bleu1(PRED, REF) == pytest.approx(1.0 * math.exp(1 - 4 / 3))  # c = 3 < r = 4
    assert rouge_l(PRED, REF) == pytest.approx(4 / 7)  # P = 2/3, R = 2/4
    # clipping: "no" counts once however often it is repeated
    assert bleu1("no no no", "No.") == pytest.approx(1 / 3)
    assert token_f1("no no no", "No.") == pytest.approx(0.5)
    assert token_recall("no no no", "No.") == 1.0
    assert bleu1("", "aorta") == 0.0 and rouge_l("", "aorta") == 0.0 and token_f1("", "aorta") == 0.0


def test_normal_is_not_no():
    # LLaVA-Med's substring rule reads "normal" as "no"; the first word decides here
    assert yes_no("Normal study.") is None
    assert score_answer("Normal study.", "No.")["closed_accuracy"] == 0.0
    assert score_answer("No, it is normal.", "No")["closed_accuracy"] == 1.0
    assert score_answer("Yes", "No, it is one frame of a cine loop.")["closed_accuracy"] == 0.0
    assert score_answer("Yes", "The shoulder")["closed_accuracy"] is None  # open question


def test_closed_answers_without_yes_or_no_stay_in_the_denominator():
    rows = [score_answer("Yes.", "yes"), score_answer("There is a lesion.", "Yes"), score_answer("x", "the liver")]
    summary = aggregate(rows)
    assert summary["n"] == 3 and summary["n_closed"] == 2
    assert summary["closed_accuracy"] == pytest.approx(0.5)  # LLaVA-Med would report 1/1
    assert summary["exact_match"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("prediction, reference", PAIRS)
def test_rouge_l_equals_rouge_score(prediction, reference):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = scorer.score(normalize_answer(reference), normalize_answer(prediction))["rougeL"].fmeasure
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


# answers that repeat words: a shared word counts as often as both sides hold it (a multiset), not once (a set)
REPEATS = [
    ("left left lung", "left lung lung"),  # multiset 2 common of 3 and 3; as sets {left, lung} would be 2 of 2
    ("no no no", "no"),
    ("mass mass", "mass in the mass and mass"),
    ("a b a c b a d", "b a c a b d a a"),
]


@pytest.mark.parametrize("prediction, reference", PAIRS + REPEATS)
def test_token_f1_and_recall_equal_rouge1(prediction, reference):
    # ROUGE-1 counts unigram overlap with clipping (min of the two counts): the multiset overlap of SQuAD's F1
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"])
    expected = scorer.score(normalize_answer(reference), normalize_answer(prediction))["rouge1"]
    assert token_f1(prediction, reference) == pytest.approx(expected.fmeasure, abs=1e-12)
    assert token_recall(prediction, reference) == pytest.approx(expected.recall, abs=1e-12)


def test_repeated_words_by_hand():
    # "left left lung" vs "left lung lung": left 1 (min 2, 1), lung 1 (min 1, 2) -> 2 common; P = R = 2/3
    assert token_f1("left left lung", "left lung lung") == pytest.approx(2 / 3)
    assert token_recall("left left lung", "left lung lung") == pytest.approx(2 / 3)
    # "mass mass" vs "mass in mass and mass" (the dropped): 2 common; P = 2/2, R = 2/5 -> F1 = 4/7
    assert token_f1("mass mass", "mass in the mass and mass") == pytest.approx(4 / 7)
    assert token_recall("mass mass", "mass in the mass and mass") == pytest.approx(2 / 5)


@pytest.mark.parametrize("prediction, reference", PAIRS)
def test_bleu1_equals_nltk(prediction, reference):
    from nltk.translate.bleu_score import sentence_bleu

    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    expected = sentence_bleu([ref], pred, weights=(1.0,)) if pred else 0.0
    assert bleu1(prediction, reference) == pytest.approx(expected, abs=1e-12)
