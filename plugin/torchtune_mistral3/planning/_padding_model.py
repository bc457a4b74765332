"""How long the recipe's sequences are: the padding each layout gets, and MedPix's sample-length distribution.

The recipe pads a batch in one of three ways (``finetune/_full.py``, ``_setup_data``):

- ``longest``: one GPU, data parallel, or tensor parallel without compile: to the longest sample of the batch;
- ``max_seq_len``: pipeline stages and compiled tensor-parallel blocks have static shapes, every batch is padded
  to ``tokenizer.max_seq_len``;
- ``packs``: ``dataset.packed=True``, every sequence is a pack of exactly ``max_seq_len`` tokens.

Under ``longest`` the computed length of a batch is the longest of its ``b`` samples; over a data set whose sample
lengths have the distribution ``F``, its expectation is ``E[max] = sum_v v (F(v)^b - F(v-)^b)`` (independent draws:
the shuffled sampler deals the rows of an epoch without replacement, which for hundreds of rows and small ``b`` is
the same to well under 1%, see the test). Under FSDP every layer's all-gather waits for the slowest replica, so a
data-parallel step runs at the longest of ``b x dp`` samples.
"""

import math
from typing import Dict, Sequence

import numpy as np

from torchtune_mistral3.models.mistral3._transform import pixtral_image_size
from torchtune_mistral3.training._compile import needs_static_shapes

# What is known of MedPix-VQA's samples (/work/shared/reference: NeMo AutoModel's Ministral-3 3B MedPix golden
# values, ~830 label tokens per 8 samples, ~4,600 tokens per step of 8; questions run 10-40 tokens; MedPix images
# are CT/MR/X-ray exports of 256 px to over 1,000 px on the long side, portrait, landscape and square). The model:
# answer tokens log-normal (median 75, sigma 0.75: mean ~100, a long tail, cut at 600), question tokens uniform in
# [10, 30], the image's long side log-uniform in [256, 1200] px and its aspect (short / long) uniform in [0.5, 1]:
# about 572 tokens per sample at max_image_size 1024 (the planner's MEDPIX_MEAN_SAMPLE_TOKENS is 575), the longest
# of 4 samples about 970.
ANSWER_MEDIAN_TOKENS = 75.0
ANSWER_SIGMA = 0.75
ANSWER_MAX_TOKENS = 600
QUESTION_TOKENS = (10, 30)
IMAGE_LONG_SIDE_PX = (256, 1200)
IMAGE_ASPECT = (0.5, 1.0)
# [BOS] [INST] ... [/INST] ... </s>: the chat template's tokens around the image, question and answer
TEMPLATE_TOKENS = 4
PIXTRAL_TOKEN_PX = 28  # one image token: a 2 x 2 merge of 14 px patches


def padding_mode(*, packed: bool, pp: int, tp: int, compile: bool) -> str:
    """The recipe's padding of a layout: ``packs``, ``max_seq_len`` or ``longest`` (see the module docstring).

    Args:
        packed (bool): ``dataset.packed``.
        pp (int): ``pipeline_parallel_dim``.
        tp (int): ``tensor_parallel_dim``.
        compile (bool): ``compile``.

    Returns:
        str: the mode.
    """
    if packed:
        return "packs"
    if pp > 1 or needs_static_shapes(compile, tp > 1):
        return "max_seq_len"
    return "longest"


def expected_longest(lengths: Sequence[int], draws: int, cap: int) -> float:
    """Expected longest of ``draws`` samples drawn from the lengths' distribution, each cut at ``cap``.

    Args:
        lengths (Sequence[int]): sample lengths in tokens (the empirical distribution).
        draws (int): samples per padded batch.
        cap (int): the longest a sample may be (``tokenizer.max_seq_len`` truncates).

    Returns:
        float: ``E[max]`` in tokens.

    Raises:
        ValueError: if ``lengths`` is empty or ``draws`` < 1.
    """
    if len(lengths) == 0 or draws < 1:
        raise ValueError(f"expected_longest needs sample lengths and draws >= 1 (got {len(lengths)} lengths, "
                         f"draws={draws})")
    values, counts = np.unique(np.minimum(np.asarray(lengths, dtype=np.int64), cap), return_counts=True)
    cdf = np.cumsum(counts) / counts.sum()
    below = np.concatenate([[0.0], cdf[:-1]])
    return float(np.sum(values * (cdf**draws - below**draws)))


def image_tokens(height: int, width: int, max_image_size: int) -> int:
    """Layout positions of one image after Pixtral's resize: ``rows x (cols + 1)`` (the breaks and the end).

    Args:
        height (int): image height in px.
        width (int): image width in px.
        max_image_size (int): ``tokenizer.max_image_size``: the longest side after resizing.

    Returns:
        int: tokens.
    """
    h, w = pixtral_image_size(height, width, max_image_size=max_image_size, token_size=PIXTRAL_TOKEN_PX)
    return h // PIXTRAL_TOKEN_PX * (w // PIXTRAL_TOKEN_PX + 1)


def medpix_sample_shapes(n: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """``n`` samples of the MedPix model (module constants): text token counts and image sizes.

    Args:
        n (int): samples.
        seed (int): random seed. Default is 0.

    Returns:
        Dict[str, np.ndarray]: ``question_tokens``, ``answer_tokens``, ``long_side_px``, ``short_side_px``,
        ``portrait`` (bool: the long side is the height).
    """
    rng = np.random.default_rng(seed)
    answer = np.exp(rng.normal(math.log(ANSWER_MEDIAN_TOKENS), ANSWER_SIGMA, n))
    answer = np.clip(np.round(answer), 5, ANSWER_MAX_TOKENS).astype(int)
    question = rng.integers(QUESTION_TOKENS[0], QUESTION_TOKENS[1] + 1, n)
    lo, hi = (math.log(x) for x in IMAGE_LONG_SIDE_PX)
    long_side = np.round(np.exp(rng.uniform(lo, hi, n))).astype(int)
    short_side = np.maximum(np.round(long_side * rng.uniform(*IMAGE_ASPECT, n)).astype(int), 1)
    return {"question_tokens": question, "answer_tokens": answer, "long_side_px": long_side,
            "short_side_px": short_side, "portrait": rng.random(n) < 0.5}


def medpix_sample_lengths(n: int, max_image_size: int, seed: int = 0) -> np.ndarray:
    """Token lengths of ``n`` samples of the MedPix model after the plugin's transform.

    Args:
        n (int): samples.
        max_image_size (int): ``tokenizer.max_image_size``.
        seed (int): random seed. Default is 0.

    Returns:
        np.ndarray: tokens per sample.
    """
    s = medpix_sample_shapes(n, seed)
    images = [image_tokens(a, b, max_image_size) for a, b in zip(s["long_side_px"], s["short_side_px"])]
    return np.asarray(images) + s["question_tokens"] + s["answer_tokens"] + TEMPLATE_TOKENS
