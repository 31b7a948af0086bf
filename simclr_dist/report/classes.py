"""Per-class results of one classifier on one test set: recall, precision, F1, worst class, confusion matrix.

Why: a mean accuracy can hide a class the model fails (Fashion-MNIST's shirt vs T-shirt/pullover/coat); the
proposal's ethics section asks for the worst class to be reported for every arm. Everything is computed from
``(y_true, y_pred)`` integer labels with numpy alone, so the numbers are checkable by hand and the same for every
arm. The confusion-matrix figure is drawn on an Agg canvas (no display, no pyplot state) and returned as PNG bytes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _labels(y: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a 1-d array of class indices, got shape {arr.shape}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0):
        raise ValueError(f"{what}: expected non-negative integer class indices")
    return arr.astype(np.int64)


def confusion_matrix(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                     num_classes: int | None = None) -> np.ndarray:
    """``(C, C)`` int64 counts, row = true class, column = predicted class."""
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"confusion_matrix: {t.size} true labels but {p.size} predictions")
    seen = int(max(t.max(initial=-1), p.max(initial=-1))) + 1
    c = seen if num_classes is None else num_classes
    if seen > c:
        raise ValueError(f"confusion_matrix: label {seen - 1} is outside num_classes={c}")
    return np.bincount(t * c + p, minlength=c * c).reshape(c, c)


@dataclass(frozen=True)
class ClassReport:
    """Per-class metrics (arrays indexed by class) and their summaries."""

    class_names: tuple[str, ...]
    support: np.ndarray  # test images per class
    recall: np.ndarray  # per-class accuracy; nan for a class absent from the test set
    precision: np.ndarray  # nan for a class never predicted
    f1: np.ndarray  # 0 where precision + recall = 0 or undefined
    accuracy: float
    macro_f1: float  # mean F1 over the classes present in y_true or y_pred (scikit-learn's default)
    balanced_accuracy: float  # mean recall over the classes present in y_true
    worst_class: int  # the class with the lowest recall (first on ties)
    confusion: np.ndarray

    @property
    def worst_class_name(self) -> str:
        return self.class_names[self.worst_class]

    @property
    def worst_recall(self) -> float:
        """Worst-class accuracy: the recall of :attr:`worst_class`."""
        return float(self.recall[self.worst_class])

    def to_dict(self) -> dict:
        """JSON-ready (lists and floats; nan -> None)."""
        def clean(a: np.ndarray) -> list:
            return [None if isinstance(v, float) and np.isnan(v) else v for v in a.tolist()]

        return {"class_names": list(self.class_names), "support": self.support.tolist(),
                "recall": clean(self.recall), "precision": clean(self.precision), "f1": clean(self.f1),
                "accuracy": self.accuracy, "macro_f1": self.macro_f1, "balanced_accuracy": self.balanced_accuracy,
                "worst_class": self.worst_class, "worst_class_name": self.worst_class_name,
                "worst_recall": self.worst_recall, "confusion": self.confusion.tolist()}


def class_report(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, *,
                 num_classes: int | None = None, class_names: Sequence[str] | None = None) -> ClassReport:
    """Recall, precision and F1 of every class, accuracy, macro-F1, balanced accuracy and the worst class."""
    c = num_classes if num_classes is not None else (len(class_names) if class_names is not None else None)
    cm = confusion_matrix(y_true, y_pred, c)
    c = cm.shape[0]
    names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(c))
    if len(names) != c:
        raise ValueError(f"class_report: {len(names)} class names for {c} classes")
    if cm.sum() == 0:
        raise ValueError("class_report: no test images")
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        pr = np.nan_to_num(precision) + np.nan_to_num(recall)
        f1 = np.where(pr > 0, 2 * np.nan_to_num(precision) * np.nan_to_num(recall) / pr, 0.0)
    present = (support > 0) | (predicted > 0)
    worst = int(np.nanargmin(recall))
    return ClassReport(names, support, recall, precision, f1, float(tp.sum() / cm.sum()), float(f1[present].mean()),
                       float(np.nanmean(recall)), worst, cm)


def confusion_png(confusion: np.ndarray, class_names: Sequence[str] | None = None, *, title: str | None = None,
                  annotate: bool | None = None, dpi: int = 110) -> bytes:
    """The confusion matrix as a PNG: colour = row-normalised share (recall on the diagonal), counts written in the
    cells when ``annotate`` (default: at most 10 classes), class names on both axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(confusion)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion_png: expected a square matrix, got shape {cm.shape}")
    c = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    if len(names) != c:
        raise ValueError(f"confusion_png: {len(names)} class names for {c} classes")
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    side = min(12.0, 2.0 + 0.55 * c)
    fig = Figure(figsize=(side + 1.2, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class (row)")
    ticks = np.arange(c)
    ax.set_xticks(ticks, names, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(ticks, names, fontsize=8)
    ax.set(xlabel="predicted class", ylabel="true class", title=title or "confusion matrix (rows normalised)")
    if annotate if annotate is not None else c <= 10:
        for i in range(c):
            for j in range(c):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
