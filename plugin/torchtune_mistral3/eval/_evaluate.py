"""The steps of a MedPix evaluation: validation loss, prompts of the rows, batched answers, the summary table."""

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchtune import utils
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from ..generation import collate_prompts, generate
from ._metrics import METRICS, aggregate, score_answer


@torch.no_grad()
def validation_loss(model: nn.Module, batches: Iterable[Dict[str, Any]], device: torch.device) -> Dict[str, float]:
    """Token-mean cross-entropy over the answer (+ ``</s>``) tokens of ``batches``, and its perplexity.

    As the training recipe's validation computes it: position t predicts token t + 1, ``-100`` labels ignored.

    Args:
        model (nn.Module): the model, in eval mode.
        batches (Iterable[Dict[str, Any]]): collated batches with ``tokens``, ``labels``, ``encoder_input``.
        device (torch.device): where the model is.

    Returns:
        Dict[str, float]: ``val_loss``, ``perplexity`` and ``label_tokens``.
    """
    total, tokens = 0.0, 0
    for batch in batches:
        utils.batch_to_device(batch, device)
        labels = batch.pop("labels")
        labels = torch.hstack((labels[:, 1:], torch.full_like(labels[:, :1], CROSS_ENTROPY_IGNORE_IDX)))
        logits = model(batch["tokens"], encoder_input=batch["encoder_input"])
        if isinstance(logits, list):
            logits = torch.cat(logits, dim=1)
        total += float(F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum"))
        tokens += int((labels != CROSS_ENTROPY_IGNORE_IDX).sum())
    loss = total / max(tokens, 1)
    return {"val_loss": loss, "perplexity": math.exp(loss), "label_tokens": tokens}


def medpix_prompts(dataset: Any, indices: Sequence[int]) -> List[Dict[str, Any]]:
    """The generation prompt, reference answer and metadata of rows of a MedPix dataset.

    Args:
        dataset (Any): a :class:`~torchtune_mistral3.datasets.MedPixDataset` (its rows and message transform are
            used, so split, filtering and column mapping are those of training).
        indices (Sequence[int]): rows to take.

    Returns:
        List[Dict[str, Any]]: per row ``messages`` (system + user turn), ``reference``, ``question``, ``mode``,
        ``case_id`` and ``index``.
    """
    out = []
    for i in indices:
        sample = dataset._message_transform(dataset._data[i])
        *prompt, answer = sample["messages"]
        question = next(c["content"] for c in prompt[-1].content if c["type"] == "text")
        out.append(
            {
                "messages": prompt,
                "reference": answer.text_content,
                "question": question,
                "mode": sample.get("mode"),
                "case_id": sample.get("case_id"),
                "index": int(i),
            }
        )
    return out


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    transform: Any,
    prompts: Sequence[Dict[str, Any]],
    *,
    batch_size: int,
    max_new_tokens: int,
    device: torch.device,
    sampling: Optional[Dict[str, Any]] = None,
) -> List[str]:
    """Answer ``prompts`` in left-padded batches with a KV cache; the text up to ``</s>``.

    Args:
        model (nn.Module): the model, in eval mode.
        transform (Any): the model transform (tokenizer + image processing).
        prompts (Sequence[Dict[str, Any]]): outputs of :func:`medpix_prompts`.
        batch_size (int): prompts per generation batch.
        max_new_tokens (int): most tokens per answer.
        device (torch.device): where the model is.
        sampling (Optional[Dict[str, Any]]): ``temperature`` / ``top_k``; None is greedy. Default is None.

    Returns:
        List[str]: one decoded answer per prompt.
    """
    sampling = sampling or {"temperature": 1.0, "top_k": 1}
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        samples = [transform({"messages": p["messages"]}, inference=True) for p in chunk]
        batch = collate_prompts(samples, pad_id=transform.pad_id)
        utils.batch_to_device(batch, device)
        out = generate(
            model,
            batch["tokens"],
            encoder_input=batch["encoder_input"],
            max_generated_tokens=max_new_tokens,
            pad_id=transform.pad_id,
            stop_tokens=transform.stop_tokens,
            **sampling,
        )
        for row in out[:, batch["tokens"].shape[1] :].tolist():
            if transform.eos_id in row:
                row = row[: row.index(transform.eos_id)]
            answers.append(transform.decode(row).strip())
    return answers


def score_predictions(prompts: Sequence[Dict[str, Any]], answers: Sequence[str]) -> Dict[str, Any]:
    """Per-row scores and their means, overall and by ``mode``.

    Args:
        prompts (Sequence[Dict[str, Any]]): outputs of :func:`medpix_prompts`.
        answers (Sequence[str]): the model's answers, in the same order.

    Returns:
        Dict[str, Any]: ``rows`` (one JSON-able record per prediction), ``overall`` and ``by_mode`` summaries.
    """
    rows = []
    for p, answer in zip(prompts, answers):
        record = {k: p[k] for k in ("index", "case_id", "mode", "question", "reference")}
        rows.append({**record, "prediction": answer, **score_answer(answer, p["reference"])})
    modes = sorted({str(r["mode"]) for r in rows})
    return {
        "rows": rows,
        "overall": aggregate(rows),
        "by_mode": {m: aggregate([r for r in rows if str(r["mode"]) == m]) for m in modes},
    }


_COLUMNS = (("n", "n"), *((m, m) for m in METRICS[:-1]), ("closed_accuracy", "closed_acc"), ("n_closed", "n_closed"))


def format_table(summary: Dict[str, Any]) -> str:
    """A plain-text table of the summary: one line overall, one per mode.

    Args:
        summary (Dict[str, Any]): the output of :func:`score_predictions`.

    Returns:
        str: the table.
    """
    groups = [("overall", summary["overall"]), *summary["by_mode"].items()]
    header = ["group"] + [title for _, title in _COLUMNS]
    lines = [header]
    for name, values in groups:
        cells = [name]
        for key, _ in _COLUMNS:
            v = values[key]
            cells.append("-" if v is None else str(v) if isinstance(v, int) else f"{v:.4f}")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)
