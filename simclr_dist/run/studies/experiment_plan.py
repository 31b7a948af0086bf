"""The plan of Experiments A and B: every input resolved and checked, and every training the study will run, before
the first one starts.

Why a plan: the fairness rules are easiest to check (and to test) on a list. Every replicate ``r`` draws its label
subsets with ``subset_seed + r`` (shared by all arms) and its initialisations and data order with ``seed + r``;
a fraction has its own number of replicates (``seeds_by_fraction``: the first N). Every trained arm, at every
fraction, runs its own log-spaced LR grid (x the weight-decay grid) on the same selection splits of that subset,
each run until early stopping on its validation split (or for ``--steps``), with the same augmentation for every
arm; its final run trains on the whole subset with the point and the number of epochs it chose. With
``tune_once`` only the first replicate of a fraction runs the grid and the others reuse its choice. A bad input
(a flag, a missing checkpoint, a class left without a validation label) costs one line and no training.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass

import numpy as np

from simclr_dist.config import ConfigError, PretrainConfig, PretrainedError, build_parser
from simclr_dist.config.experiments import ExperimentsConfig
from simclr_dist.config.supervised import SupervisedConfig, augment_tag, resolve_augment
from simclr_dist.data.datasets import check_available, load_dataset
from simclr_dist.data.splits import LabelSplit, SelectionError, label_splits, labelled_splits
from simclr_dist import storage
from simclr_dist.run.store.checkpoint import list_complete_checkpoints
from simclr_dist.run.train.classify_loop import batch_layout
from simclr_dist.run.jobs.classify_job import absolute, absolute_spec, pretrained_model_config, pretraining_config
from simclr_dist.run.jobs.pretrain_job import check_config
from simclr_dist.run.store.pretrained import PretrainedEncoder, load_pretrained

TRAINED = ("finetune", "supervised")


@dataclass(frozen=True)
class Replicate:
    index: int
    subset_seed: int  # the label subset and its selection splits
    seed: int  # initialisation, data order, augmentation


@dataclass(frozen=True)
class Cell:
    """One trained arm on one labelled subset: ``folds`` selection runs per grid point, then one final run."""

    arm: str
    fraction: float
    rep: Replicate
    folds: int


@dataclass
class Plan:
    ecfg: ExperimentsConfig  # resolved: every protocol field filled
    out: str
    run: str | None
    pretrain_cfg: PretrainConfig | None  # pretraining to run (or finish) first
    checkpoint: str | None
    model_cfg: PretrainConfig
    fractions: tuple[float, ...]
    arms: tuple[str, ...]
    baselines: tuple[str, ...]
    replicates: tuple[Replicate, ...]
    # (fraction, subset seed) -> (the final run's split, the selection splits): drawn once, here, for every arm
    splits: dict[tuple[float, int], tuple[LabelSplit, list[LabelSplit]]]
    cells: list[Cell]
    train_size: int
    pretrained: PretrainedEncoder | None = None
    pretrained_spec: str | None = None

    def grid(self, arm: str | None = None) -> list[tuple[float, float]]:
        """(lr, wd) points of ``arm``'s grid (before any extension); without an arm every point some arm tries."""
        return self.ecfg.grid(arm)

    def tuned(self, cell: Cell) -> bool:
        """Whether the cell runs its own grid: every cell, or with ``tune_once`` the first replicate's only (the
        others reuse its choice of LR, weight decay and epochs)."""
        return not self.ecfg.tune_once or cell.rep.index == 0

    def fractions_of(self, rep: Replicate) -> tuple[float, ...]:
        """The fractions of ``plan.fractions`` that replicate ``rep`` covers (its index below their replicates)."""
        return tuple(f for f in self.fractions if rep.index < self.ecfg.seeds_for(f))

    @property
    def subsets(self) -> dict[tuple[float, int], np.ndarray]:
        """(fraction, subset seed) -> the subset's train indices."""
        return {key: final.subset for key, (final, _) in self.splits.items()}

    def split_of(self, cell: Cell, val_split: int | None) -> LabelSplit:
        """The label split a classifier run of ``cell`` trains on: selection split ``val_split``, or the final."""
        final, selecting = self.splits[(cell.fraction, cell.rep.subset_seed)]
        return final if val_split is None else selecting[val_split]

    def trainings(self) -> int:
        """Classifier runs the study plans: every tuned cell's grid x folds, plus every cell's final run. A grid
        extension (a choice on the grid's edge) adds its weight decays x folds to a tuned cell, at most
        ``grid_extensions`` times."""
        return sum((len(self.grid(c.arm)) * c.folds if self.tuned(c) else 0) + 1 for c in self.cells)


def pretrain_config(ecfg: ExperimentsConfig, run: str) -> PretrainConfig:
    """The pretraining config: ``--pretrain-args`` on top of pretraining's defaults, stored at ``run``."""
    extra = shlex.split(ecfg.pretrain_args or "")
    for name in ("--storage-path", "--name"):
        if any(a == name or a.startswith(name + "=") for a in extra):
            raise ConfigError(f"--pretrain-args: {name} comes from --run STORAGE/NAME; drop it")
    storage_path, name = run.rstrip("/").rsplit("/", 1) if "/" in run.rstrip("/") else (".", run)
    args = [*extra, "--storage-path", storage_path, "--name", name]
    if ecfg.dataset is not None and "--dataset" not in extra:
        args += ["--dataset", ecfg.dataset]
    if ecfg.data_root is not None and not any(a == "--data-root" or a.startswith("--data-root=") for a in extra):
        args += ["--data-root", ecfg.data_root]  # the study's data, pretrained on where it is (a copy on a GPU host)
    parser = build_parser(PretrainConfig, "python -m simclr_dist.pretrain", "", one_line=True)
    try:
        return check_config(PretrainConfig(**vars(parser.parse_args(args))))
    except ConfigError as e:
        raise ConfigError(f"--pretrain-args: {e}") from None


def finished_checkpoint(run: str, cfg: PretrainConfig | None) -> str | None:
    """The run's latest complete checkpoint when it is finished (``cfg.epochs`` reached; any epoch without a
    config to compare with), else None: the run is pretrained, or resumed, first."""
    refs = list_complete_checkpoints(run)
    if not refs or (cfg is not None and refs[-1].epoch < cfg.epochs):
        return None
    return refs[-1].uri


def spec_digest(pre: PretrainedEncoder) -> str:
    """8 hex digits naming an import in the fine-tuned runs' names: its weights' digest, so another --pretrained
    trains other runs while the same weights read from another path (a clone elsewhere) reuse the finished ones."""
    return pre.weights_digest()[:8]


def pretrained_tag(pre: PretrainedEncoder) -> str:
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in pre.uri.rstrip("/").rsplit("/", 1)[-1])
    return f"-{pre.format}-{name}"


def resolve_source(ecfg: ExperimentsConfig):
    """(run, pretraining to do, checkpoint, network config, import, import spec) of the encoder under study."""
    pre = spec = pretrain_cfg = None
    checkpoint, run = absolute(ecfg.checkpoint), absolute(ecfg.run)
    if ecfg.pretrained is not None:
        try:
            pre = load_pretrained(absolute_spec(ecfg.pretrained), strict=ecfg.strict)
        except PretrainedError as e:
            raise ConfigError(str(e)) from None
        spec = f"{pre.format}:{pre.uri}"  # pinned: a run directory that gains a checkpoint later is another import
        return None, None, None, pretrained_model_config(pre, dataset=ecfg.dataset, image_size=ecfg.image_size,
                                                         data_root=ecfg.data_root), pre, spec
    if checkpoint is None:
        run = run or absolute(f"./runs/simclr-{ecfg.dataset or 'digits'}-resnet18")
        wanted = pretrain_config(ecfg, run) if (ecfg.pretrain_args or ecfg.pretrain) else None
        if not ecfg.pretrain:
            checkpoint = finished_checkpoint(run, wanted)
        if checkpoint is None:
            pretrain_cfg = wanted or pretrain_config(ecfg, run)
    model_cfg = pretraining_config(checkpoint) if checkpoint is not None else pretrain_cfg
    return run, pretrain_cfg, checkpoint, model_cfg, pre, spec


def make_plan(ecfg: ExperimentsConfig) -> Plan:
    """Resolve and check every input, draw every subset and selection split, and list the cells."""
    ecfg = ecfg.validate()
    if ecfg.preset:
        ecfg = ecfg.resolved(ecfg.dataset or "")  # the preset names the pretraining run before it is looked up
    run, pretrain_cfg, checkpoint, model_cfg, pre, spec = resolve_source(ecfg)
    if pre is None and ecfg.dataset is not None and ecfg.dataset != model_cfg.dataset:
        raise ConfigError(f"--dataset {ecfg.dataset}: the checkpoint was pretrained on {model_cfg.dataset}; "
                          "evaluate on its own dataset (or drop --dataset)")
    if ecfg.data_root is not None:
        model_cfg = dataclasses.replace(model_cfg, data_root=ecfg.data_root)
    ecfg = ecfg.resolved(model_cfg.dataset)
    for split in labelled_splits(model_cfg.dataset):
        check_available(model_cfg.dataset, split, model_cfg.data_root)
    default_out = (f"./runs/experiments-{ecfg.preset or model_cfg.dataset}" + ("-smoke" if ecfg.smoke else "")
                   + (pretrained_tag(pre) if pre else ""))
    out = absolute(ecfg.out or default_out)
    storage.resolve(out)  # an unknown scheme fails here; writability is checked last, as it creates the directory

    labels = np.asarray(load_dataset(model_cfg.dataset, labelled_splits(model_cfg.dataset)[0],
                                     root=model_cfg.data_root, image_size=model_cfg.image_size).targets)
    fractions, arms = ecfg.fraction_list(), ecfg.arm_list()
    jobs = [(a, f) for f in fractions for a in arms] + [("supervised", 1.0)] * ("supervised" in arms)
    n_reps = max(ecfg.seeds_for(f) for _, f in jobs)
    reps = tuple(Replicate(r, ecfg.subset_seed + r, ecfg.seed + r) for r in range(n_reps))
    splits, cells = {}, []
    for rep in reps:
        for arm, f in dict.fromkeys(jobs):
            if rep.index >= ecfg.seeds_for(f):  # this fraction has fewer replicates
                continue
            key = (f, rep.subset_seed)
            if key not in splits:
                try:
                    splits[key] = label_splits(labels, fraction=f, subset_seed=rep.subset_seed,
                                               val_fraction=ecfg.val_fraction)
                except SelectionError as e:
                    raise ConfigError(f"--fractions {f:g} (subset seed {rep.subset_seed}): {e}; raise the "
                                      "fraction") from None
            selecting = splits[key][1]
            if arm in TRAINED:
                world = ecfg.num_workers if ecfg.ray else 1
                smallest = min(len(s.fit) for s in selecting)
                _, per_worker = batch_layout(smallest, ecfg.batch_size, world)
                if per_worker < 2:
                    raise ConfigError(f"--fractions {f:g}: {smallest} labels to fit give {per_worker} image(s) per "
                                      f"worker over {world} worker(s); BatchNorm needs >= 2: drop the fraction or "
                                      "lower --num-workers")
                cells.append(Cell(arm, f, rep, len(selecting)))
    plan = Plan(ecfg, out, run, pretrain_cfg, checkpoint, model_cfg, fractions, arms, ecfg.baseline_list(), reps,
                splits, cells, len(labels), pretrained=pre, pretrained_spec=spec)
    for cell in plan.cells:  # a run directory in --out must have trained the same network and initialisation
        check_reusable(plan, arm_config(plan, cell, *plan.grid(cell.arm)[0], split=0 if cell.folds else None))
    storage.check_writable(out)
    return plan


def check_reusable(plan: Plan, scfg: SupervisedConfig) -> None:
    saved_uri = storage.join(scfg.storage_path, scfg.name, "supervised_config.json")
    if (plan.checkpoint is None and plan.pretrained is None) or not storage.exists(saved_uri):
        return
    saved = SupervisedConfig.from_dict(storage.read_json(saved_uri))
    same_weights = (saved.init_digest is not None and scfg.init_pretrained is not None
                    and plan.pretrained is not None and saved.init_digest == plan.pretrained.weights_digest())
    if saved.init_source() != scfg.init_source() and not same_weights:
        raise ConfigError(f"--out {plan.out}: {scfg.storage_path}/{scfg.name} was fine-tuned from "
                          f"{saved.init_source()}, not {scfg.init_source()}: choose a new --out")
    diff = [f"{k}={getattr(saved, k)!r}" for k in ("dataset", "image_size", "arch", "width", "cifar_stem")
            if getattr(saved, k) != getattr(scfg, k)]
    if diff:
        raise ConfigError(f"--out {plan.out}: {scfg.storage_path}/{scfg.name} trained another network or data "
                          f"({', '.join(diff)}): choose a new --out")


def arm_config(plan: Plan, cell: Cell, lr: float, wd: float, *, split: int | None,
               epochs: int | None = None) -> SupervisedConfig:
    """The classifier run of a cell at one grid point: a selection run on selection split ``split``, or the final
    run (``split=None``) on the whole subset. ``finetune`` starts from the SimCLR checkpoint (or the import),
    ``supervised`` from a random init of the same network; everything else is shared.

    Budget: with ``--steps`` every run trains that many steps (cosine). Otherwise a selection run trains up to the
    fraction's maximum epochs with early stopping (its patience, constant LR), and the final run trains for
    ``epochs`` (the number the selection runs chose; default: the fraction's maximum) at the same constant LR."""
    e, m = plan.ecfg, plan.model_cfg
    imported = plan.pretrained_spec if cell.arm == "finetune" else None
    checkpoint = (plan.checkpoint or "pending") if cell.arm == "finetune" and not imported else None
    augment = resolve_augment(e.augment, m.dataset)
    if e.early_stopping():
        if split is not None:
            budget = dict(epochs=e.max_epochs_for(cell.fraction), patience=e.patience_for(cell.fraction),
                          schedule="constant")
            tag = f"es{budget['epochs']}p{budget['patience']}"
        else:
            epochs = epochs or e.max_epochs_for(cell.fraction)  # the chosen number; unchosen yet: the maximum
            budget = dict(epochs=epochs, schedule="constant")
            tag = f"{epochs}ep-const"
    else:
        budget, tag = dict(steps=e.steps), f"{e.steps}st"
    # the recipe is in the name: a rerun with other flags trains new runs instead of extending finished ones
    name = (f"{cell.arm}-{cell.fraction:g}-s{cell.rep.subset_seed}-i{cell.rep.seed}-lr{lr:g}-wd{wd:g}-"
            f"{augment_tag(augment)}-{tag}-b{e.batch_size}" + ("" if split is None else f"-v{split}")
            + (f"-pt{spec_digest(plan.pretrained)}" if imported else ""))
    return SupervisedConfig(
        dataset=m.dataset, data_root=m.data_root, image_size=m.image_size, arch=m.arch, width=m.width,
        cifar_stem=m.cifar_stem, init_checkpoint=checkpoint, init_pretrained=imported, init_strict=e.strict,
        fraction=cell.fraction, subset_seed=cell.rep.subset_seed, seed=cell.rep.seed, val_split=split,
        val_fraction=e.val_fraction, batch_size=e.batch_size, lr=lr, weight_decay=wd, augment=augment,
        ray=e.ray, num_workers=e.num_workers, use_gpu=e.use_gpu, cpus_per_worker=e.cpus_per_worker,
        ray_address=e.ray_address, threads=e.threads, classifier_loader=e.classifier_loader,
        storage_path=storage.join(plan.out, "runs"), name=name,
        checkpoint_every=0 if split is not None else 10**6, **budget)  # selection runs keep their results file only
