"""The evaluator's configuration: which encoder (checkpoint, run, or an import), which protocols, their settings.

Why here: ``evaluate`` and ``experiments`` share the protocol settings (L2 grid, kNN, fine-tuning recipe), and every
bad flag must fail in one line before a checkpoint is read; the field rules live in the ``flag(...)`` metadata,
the rules that relate fields in :meth:`EvalConfig.check`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from simclr_dist.config.base import FORMATS, JobConfig, bad, flag, parse_weights_spec
from simclr_dist.data.datasets import DATASETS

PROTOCOLS = ("linear", "knn", "finetune")
DEFAULT_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def dataset_names() -> tuple[str, ...]:
    return tuple(DATASETS)


def parse_floats(name: str, text: str) -> tuple[float, ...]:
    """A comma-separated list of numbers of field ``name``; one-line error naming the culprit (or an empty list)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        bad(name, "is empty: give at least one value")
    out = []
    for part in parts:
        try:
            out.append(float(part))
        except ValueError:
            bad(name, f"{part!r} is not a number")
    return tuple(out)


def parse_names(name: str, text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    """A comma-separated subset of ``known`` in ``known``'s order; one-line error on an unknown or empty list."""
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in known]
    if unknown or not names:
        bad(name, f"unknown {what} {(unknown or [''])[0]!r}; choose from {', '.join(known)}")
    return tuple(p for p in known if p in names)


def check_fractions(name: str, values: tuple[float, ...]) -> None:
    for f in values:
        if not 0 < f <= 1:
            bad(name, f"each fraction must be in (0, 1], got {f:g}")


def check_l2(name: str, values: tuple[float, ...]) -> None:
    for v in values:
        if not (v >= 0 and math.isfinite(v)):
            bad(name, f"each L2 strength must be >= 0, got {v:g}")


@dataclass
class EvalConfig(JobConfig):
    checkpoint: str | None = flag(None, "one checkpoint directory (local path, s3:// or gs:// URI)")
    run: str | None = flag(None, "a run directory STORAGE/NAME: evaluate its latest complete checkpoint")
    pretrained: str | None = flag(None, "an imported encoder FORMAT:PATH_OR_URI, FORMAT one of "
                                      f"{', '.join(FORMATS)} (see simclr_dist.run.store.pretrained)")
    strict: bool = flag(True, "with --pretrained: refuse a partial load (any missing/unexpected key or shape "
                            "mismatch); --no-strict loads the matching tensors and warns")
    dataset: str | None = flag(None, "with --pretrained: dataset to evaluate on (default: a simclr-dist "
                                   "checkpoint's own; required for the other formats)", choices=dataset_names,
                               what="dataset")
    image_size: int | None = flag(None, "with --pretrained: evaluation resolution (default: the simclr-dist "
                                      "checkpoint's, else the dataset's: 224 imagenet, 96 stl10, 32 cifar, 24 digits)",
                                  ge=8)
    results_dir: str | None = flag(None, "with --pretrained: result files go to RESULTS_DIR/eval/ (default: next to a "
                                       "simclr-dist checkpoint evaluated on its own data, else "
                                       "./runs/pretrained-eval/<format>-<file>-<dataset>-<size>px)")
    watch: bool = flag(False, "with --run: poll the run and evaluate every new complete checkpoint once")
    interval: float = flag(60.0, "seconds between polls of --watch", gt=0)
    curve: str | None = flag(None, "with --run: also draw accuracy against pretraining epochs and wall time from the "
                                   "run's eval index into this PNG (and a CSV beside it)")
    watch_until_epoch: int | None = flag(None, "stop --watch once a checkpoint of this epoch (or later) is evaluated")
    protocols: str = flag("linear,knn", "comma-separated protocols: linear, knn, finetune")
    force: bool = flag(False, "re-evaluate even when a result file already exists")
    data_root: str | None = flag(None, "dataset directory on this machine (default: the pretraining run's)")
    batch_size: int = flag(256, "images per forward pass when extracting features and testing", ge=1)
    loader_workers: int = flag(0, "DataLoader worker processes (0: load in this process)", ge=0)
    threads: int = flag(0, "torch CPU threads (0: torch's default, one per core)", ge=0)
    seed: int = flag(0, "seed of the label subsets and validation split (also of the fine-tuning init and data "
                      "order)")
    # kNN
    knn_k: int = flag(200, "kNN neighbours", ge=1)
    knn_temperature: float = flag(0.1, "temperature of the kNN weighted vote", gt=0)
    # linear probe
    l2_grid: str = flag(",".join(f"{v:g}" for v in DEFAULT_L2_GRID),
                        "L2 strengths of the logistic-regression sweep (chosen on a validation split of train)")
    val_fraction: float = flag(0.2, "fraction of the labelled train split held out to choose the L2 strength",
                               gt=0, le=0.99)
    linear_max_iter: int = flag(300, "L-BFGS iterations of each logistic-regression fit", ge=1)
    linear_fractions: str = flag("1.0", "fractions of the train labels the linear probe fits on (a class-balanced "
                                        "subset each, seeded by --seed), e.g. 0.01,0.1,1.0")
    queries: str = flag("test", "what linear and kNN are scored on: test (the held-out test split) or val (a fixed "
                                "class-stratified 20%% of the labelled train split, held out of the bank and of every "
                                "probe: for curves over pretraining that must not read the test split)",
                        choices=("test", "val"), what="queries")
    # fine-tuning (simclr_dist.run.train.classify_loop, the loop of simclr_dist.supervised)
    label_fractions: str = flag("0.01,0.1,1.0", "fractions of the train labels to fine-tune on, each in (0, 1]")
    finetune_epochs: int | None = flag(None, "fine-tuning epochs (default: paper's 60 for <=1%% labels, 30 above; "
                                           "digits: 30)", ge=1)
    finetune_batch_size: int = flag(64, "fine-tuning batch size (capped at the subset size)", ge=1)
    finetune_lr: float | None = flag(None, "fine-tuning SGD (Nesterov) learning rate per 256 images, scaled "
                                         "linearly to the batch (default: paper's 0.05; digits: 0.4)", gt=0)

    def check(self) -> None:
        if sum(x is not None for x in (self.checkpoint, self.run, self.pretrained)) != 1:
            bad("checkpoint", "give exactly one of --checkpoint DIR, --run STORAGE/NAME or --pretrained FORMAT:PATH")
        if self.pretrained is not None:
            fmt, _ = parse_weights_spec(self.pretrained)
            if self.dataset is None and fmt != "simclr-dist":
                bad("dataset", f"required with --pretrained {fmt}:... (the dataset to evaluate the encoder on)")
        else:
            for name in ("dataset", "image_size", "results_dir"):
                if getattr(self, name) is not None:
                    bad(name, "only applies with --pretrained (a checkpoint is evaluated on its own data)")
        if self.watch and self.run is None:
            bad("watch", "needs --run STORAGE/NAME (it polls a run for new checkpoints)")
        if self.curve is not None and self.run is None:
            bad("curve", "needs --run STORAGE/NAME (the curve is drawn from the run's eval index)")
        if self.watch_until_epoch is not None and not self.watch:
            bad("watch_until_epoch", "only applies with --watch")
        self.protocol_list()
        check_fractions("label_fractions", self.label_fractions_list())
        check_fractions("linear_fractions", self.linear_fractions_list())
        check_l2("l2_grid", self.l2_values())

    def protocol_list(self) -> tuple[str, ...]:
        return parse_names("protocols", self.protocols, PROTOCOLS, "protocol")

    def label_fractions_list(self) -> tuple[float, ...]:
        return parse_floats("label_fractions", self.label_fractions)

    def linear_fractions_list(self) -> tuple[float, ...]:
        return parse_floats("linear_fractions", self.linear_fractions)

    def l2_values(self) -> tuple[float, ...]:
        return parse_floats("l2_grid", self.l2_grid)

    def epochs_for(self, fraction: float, dataset: str) -> int:
        """The paper fine-tunes 60 epochs on 1% of ImageNet and 30 on 10%; digits is tiny: 30 throughout."""
        if self.finetune_epochs is not None:
            return self.finetune_epochs
        return 30 if dataset == "digits" or fraction > 0.01 else 60

    def lr_for(self, dataset: str) -> float:
        """The paper's 0.05 per 256 images suits ImageNet; the tiny digits networks want ~8x more."""
        if self.finetune_lr is not None:
            return self.finetune_lr
        return 0.4 if dataset == "digits" else 0.05
