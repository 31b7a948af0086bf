"""The statistics of the study: spread over replicates, a paired test between two arms, per-class results.

Why these: one run per arm says nothing about noise, so replicates give a mean, a standard deviation and a 95%
interval (Student's t, since there are few); two arms scored on the same test images are compared with McNemar's
exact test on the images where they disagree; and a mean accuracy can hide a class the model fails, so every arm
also gets per-class recall, its worst class and macro-F1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats


def summary_stats(values: Sequence[float]) -> dict[str, float]:
    """n, mean, sample standard deviation and the 95% t-interval of the mean (equal to the mean for one value)."""
    x = np.asarray(values, dtype=np.float64)
    n, mean = len(x), float(x.mean())
    sd = float(x.std(ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else 0.0
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half}


def mcnemar(right_a: np.ndarray, right_b: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test of two classifiers on the same items (booleans: item classified correctly): ``b`` items
    only A gets right, ``c`` only B; two-sided binomial p-value of b among b + c at 1/2."""
    right_a, right_b = np.asarray(right_a, bool), np.asarray(right_b, bool)
    b, c = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    p = float(stats.binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
    return {"only_a": b, "only_b": c, "p": p}


def classification_metrics(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Per-class recall, the worst class and its accuracy, macro-F1 and the confusion matrix (rows: true class)."""
    pred, labels = np.asarray(pred, np.int64), np.asarray(labels, np.int64)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    support, predicted, hits = confusion.sum(1), confusion.sum(0), np.diag(confusion)
    recall = np.divide(hits, support, out=np.zeros(num_classes), where=support > 0)
    precision = np.divide(hits, predicted, out=np.zeros(num_classes), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(num_classes),
                   where=precision + recall > 0)
    present = support > 0
    worst = int(np.flatnonzero(present)[recall[present].argmin()])
    return {"per_class_recall": recall.tolist(), "worst_class": worst, "worst_class_acc": float(recall[worst]),
            "macro_f1": float(f1[present].mean()), "confusion": confusion.tolist()}
