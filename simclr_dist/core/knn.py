"""Weighted kNN classification of frozen features (the InstDisc monitor, also used by lightly/solo-learn).

Why kNN: it needs no training, so it is a cheap, honest signal of representation quality during pretraining
(cosine similarity, k neighbours, votes weighted by exp(sim / T)). :func:`extract_features` is the project's one
frozen-encoder feature extractor: the kNN monitor, the kNN and linear-probe protocols and the experiments use it.
On a large split it is where an evaluation waits longest, so it shows progress (:class:`~simclr_dist.console.Progress`:
a bar on a terminal, a plain line every few seconds in a log, nothing for work that ends within that).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from simclr_dist.console import Progress
from simclr_dist.core.precision import CHANNELS_LAST, Precision, to_memory_format


class TransformedSubset(torch.utils.data.Dataset):
    """``(transform(image), label)`` of the chosen items of an ``(image, label)`` dataset (all items by default)."""

    def __init__(self, base, transform, indices=None):
        self.base, self.transform = base, transform
        self.indices = range(len(base)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        img, label = self.base[self.indices[i]]
        return self.transform(img), int(label)


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset, transform, *, indices=None, batch_size: int = 256,
                     device: torch.device | str = "cpu", channels_last: bool = CHANNELS_LAST, num_workers: int = 0,
                     precision: str = "fp32", normalize: bool = True, progress: str | None = None,
                     desc: str = "extracting features") -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 on CPU, labels) of ``dataset`` items ``(image, label)`` through an eval transform: the
    encoder in eval mode (BatchNorm uses, and does not update, its running statistics; the mode is restored after),
    no gradient, ``precision`` autocast. ``normalize``: L2-normalised rows (what the kNN vote compares).
    ``progress``: the mode of the progress display (``None``: the default of :func:`~simclr_dist.console.
    progress_mode`; ``"off"``: silent), counted in images under ``desc``."""
    device = torch.device(device)
    subset = TransformedSubset(dataset, transform, indices)
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers)
    to_memory_format(encoder, channels_last)  # weights and inputs in one layout (a no-op when they already are)
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        with Progress(len(subset), desc, unit="img", mode=progress) as bar:
            for x, y in loader:  # x: (B, 3, H, W) float, normalised by the transform; y: (B,)
                x = x.to(device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with Precision.of(precision, device).autocast():
                    f = encoder(x).float()  # (B, D)
                feats.append((F.normalize(f, dim=1) if normalize else f).cpu())
                labels.append(torch.as_tensor(y))
                bar.update(len(x))
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()


@torch.no_grad()
def extract_features_distributed(encoder: nn.Module, dataset, transform, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank embeds a strided shard; the shards are gathered back into dataset order on every rank. Only rank 0
    shows progress (its shard is 1/world of the work, and the ranks move together)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return extract_features(encoder, dataset, transform, **kw)
    world, rank, n = dist.get_world_size(), dist.get_rank(), len(dataset)
    if rank != 0:
        kw["progress"] = "off"
    per = -(-n // world)
    feats, labels = extract_features(encoder, dataset, transform, indices=range(rank, n, world), **kw)
    device = kw.get("device", "cpu")
    # one padded tensor per rank: features plus the label in the last column (a single collective)
    packed = torch.zeros(per, feats.shape[1] + 1, device=device)
    packed[: len(feats), :-1] = feats.to(device)
    packed[: len(feats), -1] = labels.to(device).float()
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed)
    out = torch.empty(n, feats.shape[1] + 1)
    for r, part in enumerate(parts):
        out[r::world] = part[: len(range(r, n, world))].cpu()
    return out[:, :-1].contiguous(), out[:, -1].long()


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, *,
                num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores (N_test, C) from the k most similar training features (features already normalised)."""
    k = min(k, len(train_feats))
    scores = []
    for i in range(0, len(test_feats), chunk):
        sim = test_feats[i:i + chunk] @ train_feats.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        onehot = F.one_hot(train_labels[top_idx], num_classes).float()
        scores.append((onehot * weights.unsqueeze(-1)).sum(1))
    return torch.cat(scores)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, *, num_classes: int, k: int = 200,
                 temperature: float = 0.1) -> dict[str, float]:
    scores = knn_predict(train_feats, train_labels, test_feats, num_classes=num_classes, k=k, temperature=temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    hit = top == test_labels.unsqueeze(1)
    return {"knn_top1": hit[:, 0].float().mean().item(), "knn_top5": hit.any(1).float().mean().item()}
