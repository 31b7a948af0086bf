"""The evaluation protocols on a frozen or trained encoder: labelled data, features, linear probe, kNN, test pass.

Why these: the linear probe on frozen features is the paper's headline metric; kNN needs no training and matches
the pretraining monitor; a sharded test pass scores the classifiers the one loop trains. Protocol hygiene, since
each is a classic way to inflate numbers:
- the frozen encoder is in eval mode, without gradient, and its features are computed once (core.knn);
- the probe's L2 strength is chosen on validation splits carved from the labelled *train* images (core.probe
  never sees test data), then the probe is refit on all of them;
- every protocol returns the test predictions, so per-class recall, worst-class accuracy and a paired test
  between arms can be computed from the same images.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from simclr_dist.config import PretrainConfig
from simclr_dist.console import Log, emit
from simclr_dist.core.dist import all_sum
from simclr_dist.core.knn import TransformedSubset, extract_features, knn_predict
from simclr_dist.core.precision import Precision
from simclr_dist.core.probe import fit_logistic, select_l2, topk_accuracy
from simclr_dist.data.augment import build_eval_transform
from simclr_dist.data.datasets import dataset_info, load_dataset
from simclr_dist.data.splits import VAL_FRACTION, VAL_SEED, labelled_splits, stratified_split

__all__ = ["EvalData", "Features", "TransformedSubset", "compute_features", "finetune_components", "knn_eval",
           "linear_probe", "linear_probe_features", "load_eval_data", "predict", "select_device"]


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def finetune_components(dataset: str) -> str:
    """The paper fine-tunes with random crop + flip only; digits drop the flip (a mirrored digit is not one)."""
    return "crop" if dataset == "digits" else "crop,flip"


# ---------------------------------------------------------------------------- data
@dataclass
class EvalData:
    """The labelled splits of a dataset at the network's resolution, with the input normalisation in force."""

    dataset: str
    train: Dataset
    test: Dataset
    train_labels: np.ndarray
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def eval_transform(self) -> Callable:
        return build_eval_transform(self.image_size, self.mean, self.std)

    def test_labels(self) -> np.ndarray:
        return np.asarray(self.test.targets, dtype=np.int64)


def load_eval_data(cfg: PretrainConfig, data_root: str | None = None) -> EvalData:
    """Train/test (ImageNet: train/val) splits of the pretraining dataset, labels read without decoding images."""
    info = dataset_info(cfg.dataset)
    train_split, test_split = labelled_splits(cfg.dataset)
    root = data_root or cfg.data_root
    train = load_dataset(cfg.dataset, train_split, root=root, image_size=cfg.image_size)
    test = load_dataset(cfg.dataset, test_split, root=root, image_size=cfg.image_size)
    labels = np.asarray(train.targets, dtype=np.int64)
    num_classes = info.num_classes or len(train.classes)
    return EvalData(cfg.dataset, train, test, labels, num_classes, cfg.image_size, info.mean, info.std)


# ---------------------------------------------------------------------------- features
@dataclass
class Features:
    """Frozen-encoder features (raw, not normalised) of the labelled splits; computed once, shared by protocols."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    def subset(self, indices: Sequence[int] | np.ndarray) -> "Features":
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return dataclasses.replace(self, train_x=self.train_x[idx], train_y=self.train_y[idx])

    @classmethod
    def validation_queries(cls, train_x: Tensor, train_y: Tensor) -> "Features":
        """Bank and queries both from the labelled train split: the fixed class-stratified VAL_FRACTION (the kNN
        monitor's) held out as queries, so a curve over pretraining never reads the test split."""
        fit, val = stratified_split(train_y.numpy(), VAL_FRACTION, VAL_SEED)
        fit_i, val_i = torch.as_tensor(fit), torch.as_tensor(val)
        return cls(train_x[fit_i], train_y[fit_i], train_x[val_i], train_y[val_i])


def compute_features(encoder: nn.Module, data: EvalData, *, device: torch.device | str = "cpu",
                     batch_size: int = 256, num_workers: int = 0, queries: str = "test", log: Log = emit) -> Features:
    """Features of the labelled train split and of the queries: the test split, or (``queries="val"``) a held-out
    part of the train split (the test split is then not read at all)."""
    t0 = time.perf_counter()
    kw = dict(device=device, batch_size=batch_size, num_workers=num_workers, precision="auto", normalize=False)
    train_x, train_y = extract_features(encoder, data.train, data.eval_transform(), **kw)
    if queries == "val":
        features = Features.validation_queries(train_x, train_y)
    else:
        features = Features(train_x, train_y, *extract_features(encoder, data.test, data.eval_transform(), **kw))
    log(f"[eval] features of {len(features.train_x)} train + {len(features.test_x)} {queries} images "
        f"({train_x.shape[1]}-d) in {time.perf_counter() - t0:.1f}s")
    return features


# ---------------------------------------------------------------------------- linear probe
def linear_probe_features(features: Features, *, num_classes: int, l2_grid: Sequence[float],
                          val_fraction: float = 0.2, seed: int = 0, max_iter: int = 300,
                          splits: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
                          device: torch.device | str = "cpu", log: Log = emit) -> dict[str, Any]:
    """Choose L2 on validation splits of the labelled train features (``splits``: (fit, val) positions, mean
    validation accuracy over them; default: one stratified ``val_fraction`` hold-out), refit on all of them, and
    only then score the test features once."""
    t0 = time.perf_counter()
    if splits is None:
        fit_idx, val_idx = stratified_split(features.train_y.numpy(), val_fraction, seed)
        splits = [(fit_idx, val_idx)] if len(val_idx) else []
    val_acc: dict[str, float] = {}
    for fit_idx, val_idx in splits:
        fit_i, val_i = torch.as_tensor(fit_idx), torch.as_tensor(val_idx)
        _, accs = select_l2(features.train_x[fit_i], features.train_y[fit_i], features.train_x[val_i],
                            features.train_y[val_i], num_classes=num_classes, l2_grid=l2_grid, max_iter=max_iter,
                            device=device, log=log)
        for k, v in accs.items():
            val_acc[k] = val_acc.get(k, 0.0) + v / len(splits)
    # no validation data (one label per class): every L2 ties, and the tie rule takes the strongest
    best = max(l2_grid, key=lambda l2: (val_acc.get(f"{l2:g}", 0.0), l2))
    clf = fit_logistic(features.train_x, features.train_y, num_classes=num_classes, l2=best, max_iter=max_iter,
                       device=device)
    train_top1 = topk_accuracy(clf.logits(features.train_x), features.train_y)[0]
    logits = clf.logits(features.test_x)
    top1, top5 = topk_accuracy(logits, features.test_y)
    log(f"[eval] linear probe: chose L2 {best:g} (validation top-1 {val_acc.get(f'{best:g}', float('nan')):.4f}); "
        f"test top-1 {top1:.4f}")
    fit_size, val_size = (len(splits[0][0]), len(splits[0][1])) if splits else (len(features.train_y), 0)
    return {"top1": top1, "top5": top5, "train_top1": train_top1, "l2": best, "val_top1_by_l2": val_acc,
            "val_top1": val_acc.get(f"{best:g}"), "fit_size": fit_size, "val_size": val_size, "folds": len(splits),
            "label_count": len(features.train_y), "test_size": len(features.test_y),
            "feature_dim": int(features.train_x.shape[1]), "wall_time_s": time.perf_counter() - t0,
            "predictions": logits.argmax(1).cpu().tolist(),
            "params": {"l2_grid": list(l2_grid), "val_fraction": val_fraction, "seed": seed, "max_iter": max_iter,
                       "solver": "lbfgs", "standardize": True}}


def linear_probe(encoder: nn.Module, data: EvalData, *, device: torch.device | str = "cpu", batch_size: int = 256,
                 num_workers: int = 0, log: Log = emit, **probe_kw: Any) -> dict[str, Any]:
    """Linear evaluation of a frozen encoder: its features feed a logistic regression; the encoder never changes."""
    features = compute_features(encoder, data, device=device, batch_size=batch_size, num_workers=num_workers,
                                log=log)
    return linear_probe_features(features, num_classes=data.num_classes, device=device, log=log, **probe_kw)


# ---------------------------------------------------------------------------- kNN
def knn_eval(features: Features, *, num_classes: int, k: int = 200, temperature: float = 0.1) -> dict[str, Any]:
    """Cosine kNN (the pretraining monitor's vote, on L2-normalised features) of test against train."""
    t0 = time.perf_counter()
    scores = knn_predict(F.normalize(features.train_x, dim=1), features.train_y, F.normalize(features.test_x, dim=1),
                         num_classes=num_classes, k=k, temperature=temperature)
    top1, top5 = topk_accuracy(scores, features.test_y)
    return {"top1": top1, "top5": top5, "label_count": len(features.train_y), "test_size": len(features.test_y),
            "wall_time_s": time.perf_counter() - t0, "predictions": scores.argmax(1).tolist(),
            "params": {"k": k, "temperature": temperature}}


def knn_select_features(features: Features, *, num_classes: int, ks: Sequence[int],
                        splits: Sequence[tuple[np.ndarray, np.ndarray]], temperature: float = 0.1) -> dict[str, Any]:
    """Cosine kNN whose k is chosen on validation, like the probes' L2: each candidate k (capped at the smallest
    fit size) votes the validation images of every (fit, val) split from that split's fit images; the k with the
    best mean validation top-1 (ties: the smaller k) then votes the test images from all the labelled images, once.
    Without validation data (one label per class) the smallest k is taken and said so by ``val_top1_by_k`` empty."""
    train = F.normalize(features.train_x, dim=1)
    smallest = min((len(fit) for fit, val in splits if len(val)), default=len(train))
    candidates = sorted({min(int(k), smallest) for k in ks})
    val_acc: dict[str, float] = {}
    usable = [(fit, val) for fit, val in splits if len(val)]
    for fit, val in usable:
        fit_i, val_i = torch.as_tensor(fit), torch.as_tensor(val)
        for k in candidates:
            scores = knn_predict(train[fit_i], features.train_y[fit_i], train[val_i], num_classes=num_classes, k=k,
                                 temperature=temperature)
            top1 = topk_accuracy(scores, features.train_y[val_i])[0]
            val_acc[str(k)] = val_acc.get(str(k), 0.0) + top1 / len(usable)
    best = max(candidates, key=lambda k: (val_acc.get(str(k), 0.0), -k))
    out = knn_eval(features, num_classes=num_classes, k=min(best, len(train)), temperature=temperature)
    return {**out, "k": best, "val_top1_by_k": val_acc, "val_top1": val_acc.get(str(best)),
            "grid_edge": grid_edge_of(best, candidates) if val_acc else None}


def grid_edge_of(value: float, grid: Sequence[float]) -> str | None:
    """"low"/"high" when ``value`` is the grid's smallest/largest point (a choice at an edge: the grid may have been
    too small), else None."""
    lo = sorted(set(grid))
    if len(lo) < 2:
        return None
    return "low" if value == lo[0] else "high" if value == lo[-1] else None


# ---------------------------------------------------------------------------- a classifier's test pass
@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, transform: Callable, indices: Sequence[int] | None = None, *,
            rank: int = 0, world: int = 1, device: torch.device | str = "cpu", batch_size: int = 256,
            num_workers: int = 0) -> tuple[float, float, np.ndarray]:
    """(top-1, top-5, predicted classes in ``indices`` order) of ``model`` in eval mode (its mode is restored).
    Each rank classifies every world-th image; one all-reduce puts every prediction on every rank."""
    device = torch.device(device)
    indices = list(range(len(dataset)) if indices is None else indices)
    mine = list(range(rank, len(indices), world))
    was_training = model.training
    model.eval()
    preds = torch.zeros(len(indices), dtype=torch.float64)
    hits = torch.zeros(2, dtype=torch.float64)
    try:
        loader = torch.utils.data.DataLoader(TransformedSubset(dataset, transform, [indices[i] for i in mine]),
                                             batch_size=batch_size, num_workers=num_workers)
        pos = 0
        for x, y in loader:
            with Precision.of("auto", device).autocast():
                logits = model(x.to(device)).float().cpu()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top == y.unsqueeze(1)
            hits += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item()], dtype=torch.float64)
            preds[torch.as_tensor(mine[pos:pos + len(y)])] = top[:, 0].double() + 1  # 0: another rank's item
            pos += len(y)
    finally:
        model.train(was_training)
    packed = all_sum(torch.cat([hits, preds]).to(device)).cpu()
    n = max(1, len(indices))
    return float(packed[0] / n), float(packed[1] / n), (packed[2:] - 1).long().numpy()
