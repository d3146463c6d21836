"""Classification metrics of the SuperGLUE/GLUE evaluations (spec D.3): accuracy, macro-F1 (CB), MultiRC F1a and
per-question exact match, and ReCoRD EM/F1 with the official SQuAD-style answer normalisation.
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

METRICS = ("accuracy", "f1_macro", "f1", "f1a", "em", "record_em", "record_f1")


def accuracy(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    """Fraction of predictions equal to the labels."""
    _check_lengths(predictions, labels)
    return sum(p == g for p, g in zip(predictions, labels, strict=True)) / len(labels)


def binary_f1(predictions: Sequence[Any], labels: Sequence[Any], positive: Any = 1) -> float:
    """F1 of the positive class (0 when there are no true positives)."""
    _check_lengths(predictions, labels)
    tp = sum(p == positive and g == positive for p, g in zip(predictions, labels, strict=True))
    fp = sum(p == positive and g != positive for p, g in zip(predictions, labels, strict=True))
    fn = sum(p != positive and g == positive for p, g in zip(predictions, labels, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def f1_macro(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in labels or predictions (as sklearn)."""
    classes = sorted(set(labels) | set(predictions), key=repr)
    return sum(binary_f1(predictions, labels, c) for c in classes) / len(classes)


def multirc_em(predictions: Sequence[Any], labels: Sequence[Any], question_ids: Sequence[Any]) -> float:
    """Fraction of questions whose every answer option is classified correctly."""
    _check_lengths(predictions, labels)
    correct: dict[Any, bool] = defaultdict(lambda: True)
    for p, g, q in zip(predictions, labels, question_ids, strict=True):
        correct[q] = correct[q] and p == g
    return sum(correct.values()) / len(correct)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (the official ReCoRD rule)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 between the normalised answers."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def record_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> tuple[float, float]:
    """ReCoRD (EM, F1): per question the maximum over its gold answers, averaged over questions."""
    _check_lengths(predictions, golds)
    em = f1 = 0.0
    for pred, answers in zip(predictions, golds, strict=True):
        if not answers:
            raise ValueError("record_scores: a question has no gold answers")
        em += max(exact_match(pred, a) for a in answers)
        f1 += max(token_f1(pred, a) for a in answers)
    return em / len(golds), f1 / len(golds)


def compute_metrics(
    names: Sequence[str],
    predictions: Sequence[int],
    labels: Sequence[int],
    examples: Sequence[Any] | None = None,
) -> dict[str, float]:
    """The named metrics of one evaluation.

    Args:
        names: metric names from `METRICS`.
        predictions: predicted label index per example (ReCoRD: the predicted candidate index).
        labels: gold label index per example.
        examples: the `Example`s, needed by `em` (MultiRC question ids in `meta`) and the ReCoRD metrics
            (`meta["candidates"]`, `meta["answers"]`).

    Returns:
        {name: value}.
    """
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            out[name] = accuracy(predictions, labels)
        elif name == "f1_macro":
            out[name] = f1_macro(predictions, labels)
        elif name in ("f1", "f1a"):
            out[name] = binary_f1(predictions, labels, 1)
        elif name == "em":
            if examples is None:
                raise ValueError("metric 'em' needs the examples (question ids)")
            qids = [(e.meta.get("passage_idx"), e.meta.get("question_idx")) for e in examples]
            out[name] = multirc_em(predictions, labels, qids)
        elif name in ("record_em", "record_f1"):
            if examples is None:
                raise ValueError(f"metric {name!r} needs the examples (candidates and answers)")
            texts = [e.meta["candidates"][p] for e, p in zip(examples, predictions, strict=True)]
            em, f1 = record_scores(texts, [e.meta["answers"] for e in examples])
            out[name] = em if name == "record_em" else f1
        else:
            raise ValueError(f"unknown metric {name!r}; expected one of {METRICS}")
    return out


def _check_lengths(predictions: Sequence[Any], labels: Sequence[Any]) -> None:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("no examples to score")
