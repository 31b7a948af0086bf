"""Run a planned study (:mod:`simclr_dist.run.studies.experiment_plan`): pretraining if needed, the frozen-encoder probes and
baselines, then every trained cell (its arm's grid on the selection splits, each run early-stopped on validation,
the grid extended past an edge the choice lands on; then the final run of the chosen point for the chosen epochs).

Why this order of reads: a cell's grid runs report validation accuracy only (the loop never reads the test split
in a selection run); the chosen point's final run, and each probe after its L2 is chosen, read the test split
once. Budget first: a few timed steps of the real network give the planned time before anything long starts.
Every finished run is kept in ``--out`` and reused by a rerun.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import re
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from simclr_dist.config.supervised import SupervisedConfig
from simclr_dist.console import Log, emit
from simclr_dist.report.experiments import Record
from simclr_dist.report.experiments_md import report
from simclr_dist.report.experiments_plots import plots
from simclr_dist.report.results_file import write_results
from simclr_dist.core.models import Classifier, recalibrate_batchnorm
from simclr_dist.core.knn import TransformedSubset, extract_features
from simclr_dist.core.precision import CHANNELS_LAST, Precision, to_memory_format
from simclr_dist.data.splits import subset_digest
from simclr_dist import storage
from simclr_dist.run.store.checkpoint import MANIFEST_FILE, latest_checkpoint, load_checkpoint
from simclr_dist.run.jobs.classify_job import RESULTS_FILE, cached_result, pretraining_config, run_classifier
from simclr_dist.run.train.classify_loop import epoch_steps
from simclr_dist.run.train.evaluation import (EvalData, Features, grid_edge_of, knn_select_features,
                                             linear_probe_features, load_eval_data, select_device)
from simclr_dist.run.studies.experiment_plan import Cell, Plan, Replicate, arm_config
from simclr_dist.run.jobs.launch import RunError
from simclr_dist.run.jobs.pretrain_job import run as run_pretraining
from simclr_dist.run.store.weights import build_model
from simclr_dist.run.train.step import classify_step, pretrain_step

# ---------------------------------------------------------------------------- the budget, measured
def time_steps(model: nn.Module, batch: int, image_size: int, *, pretrain: bool, repeats: int = 5) -> float:
    """Seconds per optimiser step of ``model`` at ``batch`` images in this process: the median of ``repeats``
    steps after one warm-up step (a median, since other work on a shared machine makes single steps spike)."""
    device = select_device()
    precision = Precision.of("auto", device)
    model = to_memory_format(model.to(device), CHANNELS_LAST)  # as the loops run it
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, image_size, image_size)
    y = torch.zeros(batch, dtype=torch.long)
    scaler = precision.scaler()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        if pretrain:
            pretrain_step(model, opt, scaler, x, x, temperature=0.5, precision=precision, device=device)
        else:
            classify_step(model, opt, scaler, x, y, precision=precision, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def cell_budget(plan: Plan, cell: Cell) -> dict[str, int]:
    """Planned optimiser steps of a cell: ``selection`` (its grid on every selection split, 0 when it reuses the
    first replicate's choice), ``extension`` (what each grid extension adds), ``final``. Under early stopping these
    are the maxima: every run to its maximum epochs (the final run at most that many)."""
    e = plan.ecfg
    world = e.num_workers if e.ray else 1
    final, selecting = plan.splits[(cell.fraction, cell.rep.subset_seed)]
    if e.early_stopping():
        per_fold = [e.max_epochs_for(cell.fraction) * epoch_steps(len(s.fit), e.batch_size, world) for s in selecting]
        final_steps = e.max_epochs_for(cell.fraction) * epoch_steps(len(final.fit), e.batch_size, world)
    else:
        per_fold, final_steps = [e.steps] * len(selecting), e.steps
    wds = len(e.grid(cell.arm)) // max(1, len(e.lrs(cell.arm)))
    tuned = plan.tuned(cell)
    return {"selection": len(plan.grid(cell.arm)) * sum(per_fold) if tuned else 0,
            "extension": wds * sum(per_fold) if tuned and len(e.lrs(cell.arm)) > 1 else 0, "final": final_steps}


def plan_budget(plan: Plan, log: Log = emit) -> dict[str, Any]:
    """Time a few steps of the study's network (classifier, and pretraining when it is still to run), print the
    planned steps and time of every part, and return them (they go into results.json). Under early stopping the
    steps are maxima (every run to its maximum epochs; grid extensions counted separately)."""
    m, e = plan.model_cfg, plan.ecfg
    torch.manual_seed(0)
    net = build_model(m)
    batch = min(e.batch_size, plan.train_size)
    step_s = time_steps(Classifier(net.encoder, net.encoder.feat_dim, 10), batch, m.image_size, pretrain=False)
    trainings = plan.trainings()
    parts = {}
    for arm in ("finetune", "supervised"):
        cells = [c for c in plan.cells if c.arm == arm]
        budgets = [cell_budget(plan, c) for c in cells]
        steps = sum(b["selection"] + b["final"] for b in budgets)
        ext = e.grid_extensions * sum(b["extension"] for b in budgets)
        runs = sum((len(plan.grid(arm)) * c.folds if plan.tuned(c) else 0) + 1 for c in cells)
        parts[arm] = {"cells": len(cells), "tuned_cells": sum(plan.tuned(c) for c in cells), "runs": runs,
                      "steps": steps, "est_s": steps * step_s, "extension_steps": ext, "extension_s": ext * step_s}
    budget = {"classify_step_s": step_s, "batch": batch, "steps_per_run": e.steps, "grid": plan.grid(),
              "grids": {arm: plan.grid(arm) for arm in ("finetune", "supervised")}, "trainings": trainings,
              "parts": parts, "threads": torch.get_num_threads(), "early_stopping": e.early_stopping(),
              "tune_once": bool(e.tune_once)}
    if e.early_stopping():
        how = ("every run until early stopping: " + ", ".join(
            f"{100 * f:g}% <= {e.max_epochs_for(f)} epochs (patience {e.patience_for(f)})"
            for f in sorted(set(plan.fractions) | {c.fraction for c in plan.cells})) + "; steps below are maxima")
    else:
        how = f"every run {e.steps} steps"
    lines = [f"[exp] budget: {len(plan.replicates)} replicate(s) ("
             + ", ".join(f"{e.seeds_for(f)} at {100 * f:g}%" for f in sorted({c.fraction for c in plan.cells}))
             + f"); each arm's LR grid x wd x selection split(s)"
             + (", on the first replicate only (--tune-once)" if e.tune_once else "")
             + f", then one final run per cell; {how}; batch {e.batch_size} (measured {step_s:.3f} s/step here, "
             f"{torch.get_num_threads()} thread(s))"]
    for arm, p in parts.items():
        lines.append(f"[exp]   {arm:<10} {p['cells']:>3} cells ({p['tuned_cells']} tuned), {p['runs']:>4} runs, "
                     f"{p['steps']:>7} steps, ~{p['est_s'] / 60:.1f} min"
                     + (f" (+ up to {p['extension_steps']} steps, ~{p['extension_s'] / 60:.1f} min, if every grid "
                        f"choice lands on an edge {e.grid_extensions} time(s))" if p["extension_steps"] else ""))
    if plan.pretrain_cfg is not None:
        c = plan.pretrain_cfg
        per_worker = c.batch_size // c.num_workers
        pre_s = time_steps(build_model(c), per_worker, c.image_size, pretrain=True, repeats=3)
        steps = c.epochs * (plan.train_size // c.batch_size)
        budget["pretrain"] = {"step_s": pre_s, "steps": steps, "est_s": steps * pre_s}
        lines.append(f"[exp]   pretraining {c.epochs} epochs x {plan.train_size // c.batch_size} steps = {steps} "
                     f"steps at {c.num_workers} x {per_worker} images (measured {pre_s:.3f} s/step for one "
                     f"worker's share here), ~{steps * pre_s / 60:.1f} min")
    total = sum(p["est_s"] for p in parts.values()) + budget.get("pretrain", {}).get("est_s", 0.0)
    budget["est_total_s"] = total
    lines.append(f"[exp]   planned total ~{total / 60:.0f} min of training"
                 + (" at most, without grid extensions" if e.early_stopping() else "")
                 + " (probes, validation and test passes come on top)")
    for line in lines:
        log(line)
    return budget


# ---------------------------------------------------------------------------- the encoder under study
def pretrain_first(plan: Plan, log: Log) -> tuple[Plan, float | None]:
    """Pretrain (or finish) the plan's run through simclr_dist.pretrain's run path; the plan then points at it."""
    if plan.pretrain_cfg is None:
        return plan, None
    log(f"[exp] pretraining SimCLR into {plan.run} (simclr_dist.pretrain {plan.ecfg.pretrain_args})".rstrip())
    summary = run_pretraining(plan.pretrain_cfg)
    checkpoint = latest_checkpoint(plan.run)
    if checkpoint is None:
        raise RunError(f"--run {plan.run}: pretraining finished without a complete checkpoint")
    model_cfg = pretraining_config(checkpoint)
    if plan.ecfg.data_root is not None:
        model_cfg = dataclasses.replace(model_cfg, data_root=plan.ecfg.data_root)
    return dataclasses.replace(plan, checkpoint=checkpoint, model_cfg=model_cfg, pretrain_cfg=None), \
        summary["wall_time_s"]


def pretraining_info(plan: Plan, wall_time_s: float | None) -> dict[str, Any]:
    """What the SimCLR arms cost before any label was used: the checkpoint's per-epoch history (from its manifest)
    and the sum of its epoch times; an external import's cost is unknown (None, not 0)."""
    pre = plan.pretrained
    info: dict[str, Any] = {"checkpoint": None, "epoch": None, "history": [], "train_time_s": None,
                            "wall_time_s": wall_time_s}
    source = plan.checkpoint if pre is None else (pre.uri if pre.format == "simclr-dist" else None)
    if source is not None:
        manifest = storage.read_json(storage.join(source, MANIFEST_FILE))
        history = [{k: h[k] for k in ("epoch", "loss", "epoch_time_s", "knn_top1", "samples_per_s") if k in h}
                   for h in manifest.get("history", [])]
        info.update(checkpoint=source, epoch=manifest["epoch"], history=history,
                    train_time_s=sum(h.get("epoch_time_s", 0.0) for h in history))
    if pre is not None:
        info.update(source=pre.source, format=pre.format, uri=pre.uri, normalization=pre.normalization_text(),
                    pretrained=pre.summary(), epoch=pre.epoch)
    return info


def ssl_encoder(plan: Plan) -> nn.Module:
    if plan.pretrained is not None:
        return plan.pretrained.encoder
    model = build_model(plan.model_cfg)
    model.load_state_dict(load_checkpoint(plan.checkpoint)["model"])
    return model.encoder


# ---------------------------------------------------------------------------- probes and baselines
class FeatureBank:
    """Features of the train images some subset needs (and of the whole test split), computed once per encoder."""

    def __init__(self, encoder: nn.Module, data: EvalData, indices: np.ndarray, batch_size: int = 256):
        device = select_device()
        kw = dict(device=device, batch_size=batch_size, precision="auto", normalize=False)
        encoder = encoder.to(device)
        t0 = time.perf_counter()
        self.indices = np.unique(indices)
        train_x, train_y = extract_features(encoder, data.train, data.eval_transform(), indices=self.indices.tolist(),
                                            **kw)
        test_x, test_y = extract_features(encoder, data.test, data.eval_transform(), **kw)
        if train_x.shape[1] % 3 == 0 and isinstance(encoder, nn.Flatten):  # grey images in 3 equal planes: keep one
            planes = train_x.view(len(train_x), 3, -1)
            if torch.equal(planes[:, 0], planes[:, 1]) and torch.equal(planes[:, 0], planes[:, 2]):
                train_x, test_x = planes[:, 0].contiguous(), test_x.view(len(test_x), 3, -1)[:, 0].contiguous()
        self.features = Features(train_x, train_y, test_x, test_y)
        self.seconds = time.perf_counter() - t0
        self.charged = False

    def charge(self) -> float:
        """The pass's seconds for the first result that uses it, 0 for the rest: a bank shared by probes, fractions
        and replicates is counted once in the study's compute, not once per result."""
        if self.charged:
            return 0.0
        self.charged = True
        return self.seconds

    def of(self, subset: np.ndarray) -> Features:
        return self.features.subset(np.searchsorted(self.indices, subset))


def run_probes(plan: Plan, rep: Replicate, data: EvalData, banks: dict[str, FeatureBank], log: Log,
               paid: set[str]) -> list[dict[str, Any]]:
    """The linear probe and kNN of the SimCLR encoder, of a randomly initialised one, and logistic regression on
    raw pixels, on this replicate's subsets, with the same selection splits as the trained arms: every L2 and every
    k is chosen on those validation splits, the test split read once per probe. The random-init encoder is probed
    twice: as initialised (BatchNorm statistics of initialisation, ``random-*``) and with its BatchNorm statistics
    recalibrated on each fraction's labelled images (:func:`recalibrate_batchnorm`: no labels used, no weights
    changed; ``random-bn-*``), because neither is the obviously fair one: on Fashion-MNIST the recalibrated encoder
    measured worse (1%, seed 0: linear probe 0.47 vs 0.68), and a baseline is reported at its best, not chosen."""
    e = plan.ecfg
    wanted = (["ssl"] if "linear" in plan.arms or "knn" in plan.baselines else []) + \
             (["random", "random-bn"] if "random" in plan.baselines else []) + \
             (["pixels"] if "pixels" in plan.baselines else [])
    fractions = plan.fractions_of(rep)  # a fraction with fewer replicates is left out of the later ones
    if not fractions:
        return []
    needed = np.concatenate([plan.subsets[(f, rep.subset_seed)] for f in fractions])
    records = []
    for kind in wanted:
        for f in fractions:
            sub = plan.subsets[(f, rep.subset_seed)]
            bank = probe_bank(kind, plan, rep, data, banks, needed, sub, log, paid)
            feats = bank.of(sub)
            common = {"fraction": f, "replicate": rep.index, "subset_seed": rep.subset_seed, "seed": rep.seed,
                      "label_count": len(sub), "subset_sha256": subset_digest(sub)}
            # the plan's selection splits, as positions into the subset (what the probe's features are in)
            splits = [(np.searchsorted(sub, s.fit), np.searchsorted(sub, s.val))
                      for s in plan.splits[(f, rep.subset_seed)][1]]
            extra = {"bn_recalibrated_on": len(sub)} if kind == "random-bn" else {}
            probe = {"ssl": "linear", "random": "random-linear", "random-bn": "random-bn-linear", "pixels": "pixels"}[kind]
            if kind != "ssl" or "linear" in plan.arms:
                t0 = time.perf_counter()
                out = linear_probe_features(feats, num_classes=data.num_classes, l2_grid=e.l2_values(),
                                            splits=splits, log=lambda m: None)
                edge = grid_edge_of(out["l2"], e.l2_values())
                records.append(Record(**common, arm=probe, top1=out["top1"], top5=out["top5"],
                                      predictions=out["predictions"], chosen={"l2": out["l2"]},
                                      selection=out["val_top1_by_l2"], folds=len(splits),
                                      train_time_s=time.perf_counter() - t0 + bank.charge(),
                                      extra={**extra, "grid_edge": edge}).to_dict())
                log(f"[exp] {probe} {100 * f:g}% (replicate {rep.index}): L2 {out['l2']:g} chosen on validation"
                    + (f" (the {edge} edge of the L2 grid)" if edge else "") + f", test top-1 {out['top1']:.4f}")
            if kind != "pixels" and ("knn" in plan.baselines or kind != "ssl"):
                out = knn_select_features(feats, num_classes=data.num_classes, ks=e.knn_ks(), splits=splits)
                name = {"ssl": "knn", "random": "random-knn", "random-bn": "random-bn-knn"}[kind]
                records.append(Record(**common, arm=name, top1=out["top1"], top5=out["top5"],
                                      predictions=out["predictions"], chosen={"k": out["k"]},
                                      selection=out["val_top1_by_k"], folds=len(splits),
                                      train_time_s=out["wall_time_s"] + bank.charge(),
                                      extra={**extra, "grid_edge": out["grid_edge"]}).to_dict())
                log(f"[exp] {name} {100 * f:g}% (replicate {rep.index}): k {out['k']} chosen on validation, test "
                    f"top-1 {out['top1']:.4f}")
    return records


PROBES_VERSION = 1  # bump when run_probes records something else for the same inputs: older entries are not read


def probes_identity(plan: Plan, rep: Replicate) -> dict[str, Any] | None:
    """Everything a replicate's probe records depend on: the encoder's weights (an import's digest, or the
    checkpoint's manifest), the network, the seed of the random-init encoder, each fraction's subset and selection
    splits, the L2 grid, the k grid, the probes asked for, the device kind. None when the encoder is not settled."""
    e, m = plan.ecfg, plan.model_cfg
    if plan.pretrained is not None:
        encoder = {"weights": plan.pretrained.weights_digest(), "normalization": plan.pretrained.normalization_text()}
    elif plan.checkpoint is not None:
        manifest = storage.read_bytes(storage.join(plan.checkpoint, MANIFEST_FILE))
        encoder = {"manifest": hashlib.sha256(manifest).hexdigest()}
    else:
        return None
    fractions = {}
    for f in plan.fractions_of(rep):
        final, selecting = plan.splits[(f, rep.subset_seed)]
        fractions[f"{f:g}"] = {"subset": final.digest(),
                               "splits": [[subset_digest(s.fit), subset_digest(s.val)] for s in selecting]}
    return {"version": PROBES_VERSION, "encoder": encoder, "device": select_device().type,
            "network": {"dataset": m.dataset, "arch": m.arch, "width": m.width, "cifar_stem": m.cifar_stem,
                        "image_size": m.image_size},
            "seed": rep.seed, "fractions": fractions, "l2": list(e.l2_values()), "ks": list(e.knn_ks()),
            "linear": "linear" in plan.arms, "baselines": sorted(plan.baselines)}


def cached_probes(plan: Plan, rep: Replicate, data: EvalData, banks: dict[str, FeatureBank], log: Log,
                  paid: set[str]) -> list[dict[str, Any]]:
    """:func:`run_probes`, kept in the study's run store like a classifier run (``runs/probes-rN-KEY``, KEY a digest
    of :func:`probes_identity`) and read back by a rerun with the same identity instead of recomputed; so a study
    resumed in a later session (its run store restored from ``--runs-cache``) starts its new work at once. A read-back
    record keeps the seconds it cost when it ran (the study's compute) and is marked ``reused``. The SimCLR encoder's
    feature pass serves every replicate and is charged once: an entry says whether its records carry it, and ``paid``
    (the study's, across replicates) keeps a later replicate computed in this process from charging it again."""
    ident = probes_identity(plan, rep)
    if ident is None or not plan.fractions_of(rep):
        return run_probes(plan, rep, data, banks, log, paid)
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    uri = storage.join(plan.out, "runs", f"probes-r{rep.index}-{key}", RESULTS_FILE)
    if storage.exists(uri):
        saved = storage.read_json(uri)
        if saved.get("identity") == ident:
            log(f"[exp] probes and baselines of replicate {rep.index}: {len(saved['records'])} results read back "
                f"from {uri}")
            paid.update(saved.get("charged", []))
            return [{**r, "reused": True} for r in saved["records"]]
    before = set(paid)
    records = run_probes(plan, rep, data, banks, log, paid)
    charged = sorted(paid - before)  # the shared passes these records carry
    storage.write_json(uri, {"kind": "probes", "identity": ident, "records": records, "charged": charged})
    return records


def probe_bank(kind: str, plan: Plan, rep: Replicate, data: EvalData, banks: dict[str, FeatureBank],
               needed: np.ndarray, sub: np.ndarray, log: Log, paid: set[str]) -> FeatureBank:
    """The features a probe of ``kind`` reads: the SimCLR encoder's (one pass for every replicate: the union of all
    subsets), raw pixels or the random-init encoder as initialised (one pass per replicate), or the random-init
    encoder with its BatchNorm statistics recalibrated on this subset's images (one pass per replicate and
    fraction: the statistics depend on them)."""
    if kind == "ssl":
        if "ssl" not in banks:
            union = np.concatenate([s for (f, _), s in plan.subsets.items() if f in plan.fractions])
            banks["ssl"] = FeatureBank(ssl_encoder(plan), ssl_data(plan, data), union)
            banks["ssl"].charged = "ssl" in paid  # a read-back replicate's records already carry its seconds
            paid.add("ssl")  # else the record that reads it first charges it
            describe(kind, banks["ssl"], log)
        return banks["ssl"]
    if kind in ("pixels", "random"):
        key = f"{kind}/{rep.index}"
        if key not in banks:
            banks.pop(next((k for k in banks if k.startswith(f"{kind}/")), ""), None)  # one replicate's at a time
            if kind == "random":
                torch.manual_seed(rep.seed)
            banks[key] = FeatureBank(nn.Flatten() if kind == "pixels" else build_model(plan.model_cfg).encoder,
                                     data, needed)
            describe(kind, banks[key], log)
        return banks[key]
    torch.manual_seed(rep.seed)  # the same initial weights as the "random" probes
    encoder = build_model(plan.model_cfg).encoder
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(TransformedSubset(data.train, data.eval_transform(), sub.tolist()),
                                         batch_size=256)
    seen = recalibrate_batchnorm(encoder, (x for x, _ in loader))
    bank = FeatureBank(encoder, data, sub)
    bank.seconds = time.perf_counter() - t0  # recalibration included
    log(f"[exp] random-init BatchNorm statistics recalibrated on the {seen} labelled images of the subset")
    describe(kind, bank, log)
    return bank


def describe(kind: str, bank: FeatureBank, log: Log) -> None:
    log(f"[exp] {kind} features of {len(bank.indices)} train + {len(bank.features.test_y)} test images "
        f"({bank.features.train_x.shape[1]}-d) in {bank.seconds:.1f}s")


def ssl_data(plan: Plan, data: EvalData) -> EvalData:
    """The labelled data with the SimCLR encoder's input normalisation (an import's, when it has its own)."""
    if plan.pretrained is None:
        return data
    mean, std = plan.pretrained.mean_std()
    return dataclasses.replace(data, mean=tuple(mean), std=tuple(std))


# ---------------------------------------------------------------------------- trained cells
def grid_edge(lr: float, lrs: list[float]) -> str | None:
    """"low"/"high" when ``lr`` is the grid's lowest/highest LR (a grid of one LR has no edge to extend), else None."""
    if len(set(lrs)) < 2:
        return None
    return "low" if lr == min(lrs) else "high" if lr == max(lrs) else None


def beyond(lrs: list[float], edge: str) -> float:
    """One more log step past ``edge``: the grid's spacing at that edge (the ratio of its two outermost LRs)."""
    lo = sorted(set(lrs))
    new = lo[0] ** 2 / lo[1] if edge == "low" else lo[-1] ** 2 / lo[-2]
    return float(f"{new:.6g}")


def converged_under_a_smaller_maximum(scfg: SupervisedConfig, log: Log) -> dict[str, Any] | None:
    """A finished selection run of the same experiment under a smaller maximum of epochs (its name differs only in
    ``esNpP``) that stopped on patience before that maximum: it is this run. Under early stopping the LR is constant,
    so a maximum changes nothing before it is reached: the trajectory, the stopping and best epochs and the
    best-validation weights are the same (a larger maximum lets a run that reached the old one go on; one that
    converged never got there). Returned with ``same_as_max_epochs`` N; None when there is none."""
    m = re.fullmatch(r"(.*-)es(\d+)p(\d+)(-.*)", scfg.name or "")
    if m is None or scfg.patience is None or scfg.val_split is None or not scfg.epochs:
        return None
    sibling = re.compile(re.escape(m[1]) + r"es(\d+)p" + m[3] + re.escape(m[4]))
    for other in sorted(storage.list_names(scfg.storage_path)):
        o = sibling.fullmatch(other)
        if o is None or int(o[1]) >= scfg.epochs:
            continue
        prior = cached_result(dataclasses.replace(scfg, name=other, epochs=int(o[1])))
        if prior and prior.get("converged") and (prior.get("stopped_epoch") or int(o[1])) < int(o[1]):
            log(f"[supervised] {other}: stopped on patience at epoch {prior['stopped_epoch']} of at most {o[1]}: "
                f"the same run as at most {scfg.epochs} epochs (constant LR); reusing it "
                f"(validation top-1 {prior['score']:.4f})")
            return {**prior, "same_as_max_epochs": int(o[1])}
    return None


class StudyPaused(Exception):
    """``--time-limit`` reached: the study starts no new classifier run (finished runs are kept, a rerun goes on)."""


def time_guard(deadline: float | None, limit_min: float | None) -> Callable[[str], None] | None:
    """``before_training`` for every classifier run of the study: past ``deadline`` (``time.perf_counter()``) a run
    that is not finished does not start."""
    if deadline is None:
        return None

    def guard(run: str) -> None:
        if time.perf_counter() > deadline:
            raise StudyPaused(f"the time limit of {limit_min:g} min is reached; {run} and the runs after it have "
                              "not started")
    return guard


def select(plan: Plan, cell: Cell, data: EvalData, log: Log,
           guard: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The cell's arm grid on every selection split (validation only), then the choice: the best mean validation
    top-1 over the splits (ties: the first point of the grid). A choice on the grid's lowest or highest LR runs one
    more log step beyond that edge (at every weight decay) and chooses again, at most ``grid_extensions`` times.
    Under early stopping the final run's epochs are the chosen point's mean best epoch over the splits, rounded up
    (each selection run stopped on its own validation split, its best epoch's weights kept)."""
    e = plan.ecfg
    lrs = list(e.lrs(cell.arm))
    wds = list(dict.fromkeys(wd for _, wd in e.grid(cell.arm)))
    runs: dict[tuple[float, float], list[dict[str, Any]]] = {}

    def run_points(points: list[tuple[float, float]]) -> None:
        for lr, wd in points:
            runs[(lr, wd)] = [run_classifier(arm_config(plan, cell, lr, wd, split=k), data=data,
                                             split=plan.split_of(cell, k), log=log, before_training=guard,
                                             equivalent=converged_under_a_smaller_maximum)
                              for k in range(cell.folds)]

    def choose() -> tuple[float, float]:
        order = list(runs)
        return max(order, key=lambda p: (float(np.mean([r["score"] for r in runs[p]])), -order.index(p)))

    run_points(e.grid(cell.arm))
    best = choose()
    first_edge = edge = grid_edge(best[0], lrs)
    extended: list[float] = []
    while edge is not None and len(extended) < e.grid_extensions:
        new = beyond(lrs, edge)
        log(f"[exp] {cell.arm} {100 * cell.fraction:g}% (replicate {cell.rep.index}): lr {best[0]:g} is the "
            f"{edge} edge of the grid {', '.join(f'{v:g}' for v in sorted(lrs))}: extending it to lr {new:g}")
        lrs.append(new)
        extended.append(new)
        run_points([(new, wd) for wd in wds])
        best = choose()
        edge = grid_edge(best[0], lrs)
    chosen_runs = runs[best]
    all_runs = [r for rs in runs.values() for r in rs]
    detail = {f"lr={lr:g},wd={wd:g}": {
        "val_top1": float(np.mean([r["score"] for r in rs])), "val_top1_by_split": [r["score"] for r in rs],
        "best_epochs": [r.get("best_epoch") for r in rs], "stopped_epochs": [r.get("stopped_epoch") for r in rs],
        "hit_max_epochs": [bool(r.get("hit_max_epochs")) for r in rs],
        "diverged": [bool(r.get("diverged")) for r in rs]} for (lr, wd), rs in runs.items()}
    epochs = None
    if e.early_stopping():
        epochs = max(1, math.ceil(np.mean([r.get("best_epoch") or 0 for r in chosen_runs])))
    return {
        "lr": best[0], "wd": best[1], "epochs": epochs, "replicate": cell.rep.index,
        "selection": {k: d["val_top1"] for k, d in detail.items()}, "selection_detail": detail,
        "curves": [r["curve"] for r in chosen_runs], "lr_grid": sorted(lrs), "grid_edge": first_edge,
        "grid_extended": extended, "edge_after_extension": edge,
        "best_epochs": [r.get("best_epoch") for r in chosen_runs],
        "hit_max_epochs": any(r.get("hit_max_epochs") for r in chosen_runs),
        "selection_runs": len(all_runs), "selection_time_s": sum(r.get("train_time_s") or 0.0 for r in all_runs),
        "selection_images_seen": sum(r.get("images_seen") or 0 for r in all_runs),
        "any_hit_max_epochs": sum(bool(r.get("hit_max_epochs")) for r in all_runs),
        # how each selection run's batches were made (a run from before the field: the torch path)
        "selection_loaders": sorted({r.get("classifier_loader") or "torch" for r in all_runs}),
    }


def run_cell(plan: Plan, cell: Cell, data: EvalData, log: Log,
             tuned: dict[tuple[str, float], dict[str, Any]] | None = None,
             guard: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The arm's grid on the cell's selection splits (:func:`select`), then the final run of the chosen point: on
    the whole subset, for the chosen number of epochs (under early stopping), reading the test split once.

    Why the final run retrains instead of keeping a selection run's best-validation weights: those were fitted
    without the validation labels (a fifth of a small subset, or a k-th of it per fold) and there is one per split;
    the final model gets every label, for the epochs the splits agreed on, at the same constant LR.

    ``tuned``: choices already made, by (arm, fraction); with ``tune_once`` a later replicate reuses the first
    replicate's (its LR, weight decay and epochs), recorded as ``tuned_on_replicate``, and its tuning compute is not
    counted again (``selection_time_s`` 0)."""
    e = plan.ecfg
    key = (cell.arm, cell.fraction)
    reused = tuned is not None and not plan.tuned(cell) and key in tuned
    choice = tuned[key] if reused else select(plan, cell, data, log, guard)
    if tuned is not None and not reused:
        tuned.setdefault(key, choice)
    final = run_classifier(arm_config(plan, cell, choice["lr"], choice["wd"], split=None, epochs=choice["epochs"]),
                           data=data, split=plan.split_of(cell, None), log=log, before_training=guard)
    how = (f"reusing replicate {choice['replicate']}'s choice: " if reused else "chose ")
    score = choice["selection"][f"lr={choice['lr']:g},wd={choice['wd']:g}"]
    added = ", ".join(f"{v:g}" for v in choice["grid_extended"])
    ext = f"; grid extended past its {choice['grid_edge']} edge to {added}" if added else ""
    log(f"[exp] {cell.arm} {100 * cell.fraction:g}% (replicate {cell.rep.index}): {how}lr {choice['lr']:g} wd "
        f"{choice['wd']:g}" + (f", {choice['epochs']} epochs" if choice["epochs"] else "")
        + f" (validation top-1 {score:.4f} over {cell.folds} split(s){ext}); test top-1 {final['top1']:.4f}")
    if not reused and choice["edge_after_extension"] is not None:
        log(f"[exp] WARNING {cell.arm} {100 * cell.fraction:g}%: the choice is still at the "
            f"{choice['edge_after_extension']} edge after {len(choice['grid_extended'])} extension(s): widen --lr-grid-{cell.arm}")
    if not reused and choice["hit_max_epochs"]:
        log(f"[exp] WARNING {cell.arm} {100 * cell.fraction:g}%: a selection run of the chosen point reached the "
            f"maximum of {e.max_epochs_for(cell.fraction)} epochs still improving: the budget was too small "
            "(raise --max-epochs)")
    p = final["params"]
    chosen = {"lr": choice["lr"], "wd": choice["wd"]} | ({"epochs": choice["epochs"]} if choice["epochs"] else {})
    extra = {
        "tune_once": bool(e.tune_once), "tuned_on_replicate": choice["replicate"], "lr_grid": choice["lr_grid"],
        "grid_edge": choice["grid_edge"], "grid_extended": choice["grid_extended"],
        "edge_after_extension": choice["edge_after_extension"], "selection_detail": choice["selection_detail"],
        "epochs_chosen": choice["epochs"], "best_epochs": choice["best_epochs"],
        "hit_max_epochs": choice["hit_max_epochs"], "selection_runs_hit_max_epochs": choice["any_hit_max_epochs"],
        "selection_runs": 0 if reused else choice["selection_runs"],
        "selection_images_seen": 0 if reused else choice["selection_images_seen"],
        "images_seen": final.get("images_seen"), "schedule": p.get("schedule"),
        # the same augmentation distribution either way, other draws (tests/run/test_classifier_resident.py)
        "classifier_loader": final.get("classifier_loader") or "torch",
        "selection_loaders": [] if reused else choice["selection_loaders"],
        "early_stopping": e.early_stopping(),
        "max_epochs": e.max_epochs_for(cell.fraction) if e.early_stopping() else None,
        "patience": e.patience_for(cell.fraction) if e.early_stopping() else None,
    }
    return Record(
        arm=cell.arm, fraction=cell.fraction, replicate=cell.rep.index, subset_seed=cell.rep.subset_seed,
        seed=cell.rep.seed, label_count=final["label_count"], subset_sha256=final["subset_sha256"],
        top1=final["top1"], top5=final["top5"], predictions=final["predictions"], chosen=chosen,
        train_time_s=final["train_time_s"], selection=choice["selection"], folds=cell.folds, curves=choice["curves"],
        history=final["history"], steps=p["steps"], epochs=p["steps"] / p["steps_per_epoch"],
        global_batch=p["global_batch"], peak_lr=p["peak_lr"], lr_rule=p["lr_rule"], augment=p["augment"],
        selection_time_s=0.0 if reused else choice["selection_time_s"], reused=bool(final.get("cached")),
        normalization=final.get("normalization"), run=final["run"], extra=extra).to_dict()


def study_order(plan: Plan) -> list[tuple[str, Replicate, Cell | None]]:
    """The order the study runs in: fraction by fraction, smallest (cheapest) first, replicate by replicate within
    a fraction, so a study that spans sessions completes Experiment A's fractions before Experiment B's 100% runs
    (the bulk of the compute); the first replicate of each fraction comes first (``--tune-once`` reuses its
    choices). A replicate's probes and baselines (every fraction at once) run just before its first cell."""
    fractions = sorted({c.fraction for c in plan.cells})
    cells = sorted(plan.cells, key=lambda c: (fractions.index(c.fraction), c.rep.index))
    parts: list[tuple[str, Replicate, Cell | None]] = []
    probed: set[int] = set()
    for c in cells:
        if c.rep.index not in probed:
            probed.add(c.rep.index)
            parts.append(("probes", c.rep, None))
        parts.append(("cell", c.rep, c))
    parts += [("probes", r, None) for r in plan.replicates if r.index not in probed]  # a study of probes only
    return parts


def execute(plan: Plan, *, log: Log = emit, on_update=None) -> dict[str, Any]:
    """Run the whole study; ``on_update(plan, records, pretraining, budget, elapsed_s, complete, data)`` is called
    after every part that trained or computed something (the command writes results.json and the report of what is
    done so far there); parts read back from finished runs are reported with the next new one, or by the caller
    at the end."""
    t_start = time.perf_counter()
    if plan.ecfg.threads:
        torch.set_num_threads(plan.ecfg.threads)
    budget = plan_budget(plan, log)
    plan, pre_wall = pretrain_first(plan, log)
    pretraining = pretraining_info(plan, pre_wall)
    if plan.pretrained is not None:
        log(plan.pretrained.describe())
    data = load_eval_data(plan.model_cfg, plan.ecfg.data_root)
    records: list[dict[str, Any]] = []
    banks: dict[str, FeatureBank] = {}
    paid: set[str] = set()  # shared feature passes already charged to some record (cached_probes)
    tuned: dict[tuple[str, float], dict[str, Any]] = {}  # --tune-once: the first replicate's choices
    parts = study_order(plan)
    limit = plan.ecfg.time_limit
    guard = time_guard(None if limit is None else t_start + 60 * limit, limit)
    # A part read back whole from finished runs (a study resumed in a later session replays every part before its
    # new work) defers the update: summarising, packing and plotting after each of 60 replayed parts cost ~10 min
    # per restart. The deferred update is made before the first run that trains (so a time limit that stops it
    # leaves the report of everything replayed) and by the caller at the end.
    pending, trainings = False, [0]

    def update() -> None:
        nonlocal pending
        pending = False
        if on_update is not None:
            on_update(plan, records, pretraining, budget, time.perf_counter() - t_start, False, data)

    def before_training(run: str) -> None:
        if pending:
            update()
        if guard is not None:
            guard(run)
        trainings[0] += 1

    for i, (kind, rep, cell) in enumerate(parts, 1):
        what = "probes and baselines" if cell is None else f"{cell.arm} at {100 * cell.fraction:g}%"
        log(f"[exp] ({i}/{len(parts)}, {(time.perf_counter() - t_start) / 60:.1f} min) replicate {rep.index} "
            f"(subset seed {rep.subset_seed}, seed {rep.seed}): {what}")
        trained_before, done_before = trainings[0], len(records)
        if cell is None:
            records += cached_probes(plan, rep, data, banks, log, paid)
        else:
            records.append(run_cell(plan, cell, data, log, tuned, before_training))
        replayed = trainings[0] == trained_before and all(r.get("reused") for r in records[done_before:])
        pending = replayed
        if not replayed:
            update()
    for r in records:  # the fairness invariant: every arm of a replicate trained on the one drawn subset
        if r["subset_sha256"] != subset_digest(plan.subsets[(r["fraction"], r["subset_seed"])]):
            raise RuntimeError(f"{r['arm']} at {r['fraction']:g} trained on another label subset than the other arms")
    return {"plan": plan, "records": records, "pretraining": pretraining, "budget": budget,
            "elapsed_s": time.perf_counter() - t_start, "data": data}


ROW_FIELDS = ["arm", "fraction", "label_count", "n", "mean", "sd", "ci_low", "ci_high", "worst_class", "macro_f1",
              "steps", "epochs", "train_time_s"]
# per_seed.csv: one row per (arm, fraction, replicate), the unit of the tests; "chosen" is the point the replicate
# used (lr/wd/epochs of a trained arm, l2 of a probe, k of kNN), "tuned_on_replicate" where that choice was made
SEED_FIELDS = ["arm", "fraction", "label_count", "replicate", "seed", "subset_seed", "subset_sha256", "top1", "top5",
               "macro_f1", "worst_class", "worst_class_acc", "chosen", "tuned_on_replicate", "grid_edge",
               "hit_max_epochs", "steps", "images_seen", "train_time_s", "selection_time_s", "classifier_loader"]


def write_outputs(out: str, summary: dict[str, Any]) -> None:
    """results.json, results.csv (one row per arm and fraction), per_seed.csv (one row per replicate of each),
    report.md and the plots, into ``--out``."""
    write_results(storage.join(out, "results.json"), summary)
    storage.write_bytes(storage.join(out, "results.csv"), csv_text(ROW_FIELDS, summary.get("rows", [])))
    seeds = sorted(summary.get("records", []), key=lambda r: (r["fraction"], r["arm"], r.get("replicate") or 0))
    storage.write_bytes(storage.join(out, "per_seed.csv"), csv_text(SEED_FIELDS, [
        {**r, "chosen": ";".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                                 for k, v in sorted((r.get("chosen") or {}).items()))} for r in seeds]))
    for name, data in plots(summary).items():
        storage.write_bytes(storage.join(out, name), data)
    storage.write_bytes(storage.join(out, "report.md"), report(summary).encode())


def csv_text(fields: list[str], rows: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()
