"""``--online-probe``: what feeds the online linear probe during pretraining, and what it reports per epoch.

Which labels it sees: the labelled train split (the ``--train-subset`` images when given) cut by
:func:`simclr_dist.data.splits.validation_split` into the part the probe trains on (80%) and the fixed,
class-stratified validation part (20%) it is scored on, the same split ``--knn-split val`` uses; the test split
is never read. Why a stream of its own rather than the labels of the pretraining batch: a loader yields labels, not
which image they belong to, so the probe could not tell a validation image from a training one there, and
validation labels would leak into the head.

Each step the probe takes ``batch`` images of its training part, drawn from (seed, step) alone (so a resumed run
draws what an uninterrupted one draws; over several workers each takes its slice of one global draw), embeds them
with the encoder in eval mode under ``no_grad`` (BatchNorm statistics untouched), and makes one SGD step on the
head (:mod:`simclr_dist.core.online_probe`). Per epoch: the head's top-1 on the validation part and RankMe of the
validation features. A training part that fits in ``CACHE_BYTES`` as float tensors after the (deterministic) eval
transform is transformed once and indexed from then on (digits: 8 MB), so a step pays for the encoder's forward, not
for per-image Python transforms. Its cost per step is measured by ``python -m bench.online_probe`` (the step with
and without the probe, interleaved; CPU, 1 thread): 1.18x the step on the digits tiny config and 1.15x on the digits
default (2-core box at load ~3; 1.35x and 1.40x at load ~10), what one eval-mode forward of a batch next to the
step's two-view forward and backward should cost; plus one pass over the validation part per epoch (0.1-0.3 s).
"""

from __future__ import annotations

from typing import Any

import torch

from simclr_dist.config import PretrainConfig
from simclr_dist.core.knn import TransformedSubset, extract_features, extract_features_distributed
from simclr_dist.core.online_probe import OnlineProbe, probe_optimizer, probe_top1, probe_update, rankme
from simclr_dist.core.precision import Precision
from simclr_dist.data.augment import build_eval_transform
from simclr_dist.data.datasets import dataset_info, load_dataset
from simclr_dist.data.epoch_order import mix64
from simclr_dist.data.splits import fixed_subset, labelled_splits, validation_split

CACHE_BYTES = 256 * 2**20  # the probe's training images held transformed in memory up to this size


class ProbeStream:
    """The online probe of one worker: its labelled data, its head and optimizer, and its running loss."""

    def __init__(self, cfg: PretrainConfig, feature_dim: int, *, device: torch.device, channels_last: bool,
                 rank: int, world: int):
        info = dataset_info(cfg.dataset)
        labelled = fixed_subset(load_dataset(cfg.dataset, labelled_splits(cfg.dataset)[0], root=cfg.data_root,
                                             image_size=cfg.image_size), cfg.train_subset)
        self.fit, self.val = validation_split(labelled)  # never the test split
        self.transform = build_eval_transform(cfg.image_size, info.mean, info.std)
        num_classes = info.num_classes or int(torch.as_tensor(labelled.targets).max()) + 1
        self.head = OnlineProbe(feature_dim, num_classes).to(device)
        self.optimizer = probe_optimizer(self.head)
        self.cfg, self.device, self.channels_last, self.rank, self.world = cfg, device, channels_last, rank, world
        self.batch = cfg.batch_size // world  # per worker, as the pretraining batch
        self.loss_sum = torch.zeros((), device=device)
        self.precision = Precision.of(cfg.precision, device)
        fits = len(self.fit) * 3 * cfg.image_size ** 2 * 4 <= CACHE_BYTES
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = self.transformed() if fits else None

    def transformed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole training part through the eval transform: ((N, 3, S, S) float on the device, (N,) labels)."""
        items = TransformedSubset(self.fit, self.transform)
        x = torch.stack([items[i][0] for i in range(len(items))])
        y = torch.as_tensor([int(self.fit[i][1]) for i in range(len(self.fit))])
        return x.to(self.device), y.to(self.device)

    def indices(self, step: int) -> list[int]:
        """This rank's slice of global step ``step``'s draw from the training part: a function of (seed, step)."""
        g = torch.Generator().manual_seed(mix64(self.cfg.seed, step, 0x0B) >> 1)
        draw = torch.randint(len(self.fit), (self.batch * self.world,), generator=g)  # (B_global,)
        return draw[self.rank::self.world].tolist()

    def update(self, encoder: torch.nn.Module, step: int) -> None:
        """One probe step at global step ``step`` (no host sync: the loss stays on the device)."""
        if self.cache is not None:
            idx = torch.as_tensor(self.indices(step), device=self.device)
            x = self.cache[0][idx]  # (B, 3, S, S)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            was_training = encoder.training
            encoder.eval()  # BatchNorm on (and not updating) its running statistics
            try:
                with torch.no_grad(), self.precision.autocast():
                    feats = encoder(x).float()  # (B, D)
            finally:
                encoder.train(was_training)
            self.loss_sum += probe_update(self.head, self.optimizer, feats, self.cache[1][idx])
            return
        feats, labels = extract_features(encoder, self.fit, self.transform, indices=self.indices(step),
                                         batch_size=self.batch, device=self.device, channels_last=self.channels_last,
                                         precision=self.cfg.precision, normalize=False, progress="off")  # (B, D)
        self.loss_sum += probe_update(self.head, self.optimizer, feats.to(self.device), labels.to(self.device))

    def evaluate(self, encoder: torch.nn.Module, steps: int) -> dict[str, float]:
        """``online_probe_top1`` on the validation part, ``rankme`` of its features, ``online_probe_loss``: the
        mean probe loss over the ``steps`` steps since the last call (0 when none ran)."""
        feats, labels = extract_features_distributed(encoder, self.val, self.transform, device=self.device,
                                                     channels_last=self.channels_last, normalize=False,
                                                     progress="off")  # (N_val, D), on every rank
        out = {"online_probe_top1": probe_top1(self.head, feats.to(self.device), labels.to(self.device)),
               "rankme": rankme(feats), "online_probe_loss": float(self.loss_sum) / max(1, steps)}
        self.loss_sum.zero_()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
