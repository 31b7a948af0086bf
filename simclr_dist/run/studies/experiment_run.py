"""Run a planned study (:mod:`simclr_dist.run.studies.experiment_plan`): pretraining if needed, the frozen-encoder probes and
baselines, then every trained cell (grid on the selection splits, final run on the chosen grid point).

Why this order of reads: a cell's grid runs report validation accuracy only (the loop never reads the test split
in a selection run); the chosen point's final run, and each probe after its L2 is chosen, read the test split
once. Budget first: a few timed steps of the real network give the planned time before anything long starts.
Every finished run is kept in ``--out`` and reused by a rerun.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from simclr_dist.console import Log, emit
from simclr_dist.report.experiments import Record
from simclr_dist.report.experiments_md import report
from simclr_dist.report.experiments_plots import plots
from simclr_dist.core.models import Classifier
from simclr_dist.core.knn import extract_features
from simclr_dist.core.precision import CHANNELS_LAST, Precision, to_memory_format
from simclr_dist.data.splits import subset_digest
from simclr_dist import storage
from simclr_dist.run.store.checkpoint import MANIFEST_FILE, latest_checkpoint, load_checkpoint
from simclr_dist.run.jobs.classify_job import pretraining_config, run_classifier
from simclr_dist.run.train.evaluation import EvalData, Features, knn_eval, linear_probe_features, load_eval_data, select_device
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


def plan_budget(plan: Plan, log: Log = emit) -> dict[str, Any]:
    """Time a few steps of the study's network (classifier, and pretraining when it is still to run), print the
    planned steps and time of every part, and return them (they go into results.json)."""
    m, e = plan.model_cfg, plan.ecfg
    torch.manual_seed(0)
    net = build_model(m)
    batch = min(e.batch_size, plan.train_size)
    step_s = time_steps(Classifier(net.encoder, net.encoder.feat_dim, 10), batch, m.image_size, pretrain=False)
    grid, trainings = plan.grid(), plan.trainings()
    parts = {}
    for arm in ("finetune", "supervised"):
        cells = [c for c in plan.cells if c.arm == arm]
        runs = sum(len(grid) * c.folds + 1 for c in cells)
        parts[arm] = {"cells": len(cells), "runs": runs, "steps": runs * e.steps, "est_s": runs * e.steps * step_s}
    budget = {"classify_step_s": step_s, "batch": batch, "steps_per_run": e.steps, "grid": grid,
              "trainings": trainings, "parts": parts, "threads": torch.get_num_threads()}
    lines = [f"[exp] budget: {len(plan.replicates)} replicate(s) x fractions {', '.join(f'{f:g}' for f in plan.fractions)}"
             f"; grid {len(grid)} (lr x wd) x selection split(s), then one final run per cell; every run "
             f"{e.steps} steps at batch {e.batch_size} (measured {step_s:.3f} s/step here, "
             f"{torch.get_num_threads()} thread(s))"]
    for arm, p in parts.items():
        lines.append(f"[exp]   {arm:<10} {p['cells']:>3} cells, {p['runs']:>4} runs, {p['steps']:>7} steps, "
                     f"~{p['est_s'] / 60:.1f} min")
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
    lines.append(f"[exp]   planned total ~{total / 60:.0f} min of training (probes, validation and test passes "
                 "come on top)")
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

    def of(self, subset: np.ndarray) -> Features:
        return self.features.subset(np.searchsorted(self.indices, subset))


def run_probes(plan: Plan, rep: Replicate, data: EvalData, banks: dict[str, FeatureBank], log: Log
               ) -> list[dict[str, Any]]:
    """The linear probe and kNN of the SimCLR encoder, of a randomly initialised one, and logistic regression on
    raw pixels, on this replicate's subsets, with the same selection splits as the trained arms."""
    e = plan.ecfg
    wanted = (["ssl"] if "linear" in plan.arms or "knn" in plan.baselines else []) + \
             (["random"] if "random" in plan.baselines else []) + (["pixels"] if "pixels" in plan.baselines else [])
    needed = np.concatenate([plan.subsets[(f, rep.subset_seed)] for f in plan.fractions])
    records = []
    for kind in wanted:
        if kind == "ssl":
            if "ssl" not in banks:  # one pass for every replicate: the union of all their subsets
                union = np.concatenate([s for (f, _), s in plan.subsets.items() if f in plan.fractions])
                banks["ssl"] = FeatureBank(ssl_encoder(plan), ssl_data(plan, data), union)
            bank = banks["ssl"]
        elif kind == "random":
            torch.manual_seed(rep.seed)
            bank = FeatureBank(build_model(plan.model_cfg).encoder, data, needed)
        else:
            bank = FeatureBank(nn.Flatten(), data, needed)
        log(f"[exp] {kind} features of {len(bank.indices)} train + {len(bank.features.test_y)} test images "
            f"({bank.features.train_x.shape[1]}-d) in {bank.seconds:.1f}s")
        for f in plan.fractions:
            sub = plan.subsets[(f, rep.subset_seed)]
            feats = bank.of(sub)
            common = {"fraction": f, "replicate": rep.index, "subset_seed": rep.subset_seed, "seed": rep.seed,
                      "label_count": len(sub), "subset_sha256": subset_digest(sub)}
            probe = {"ssl": "linear", "random": "random-linear", "pixels": "pixels"}[kind]
            if kind != "ssl" or "linear" in plan.arms:
                # the plan's selection splits, as positions into the subset (what the probe's features are in)
                splits = [(np.searchsorted(sub, s.fit), np.searchsorted(sub, s.val))
                          for s in plan.splits[(f, rep.subset_seed)][1]]
                t0 = time.perf_counter()
                out = linear_probe_features(feats, num_classes=data.num_classes, l2_grid=e.l2_values(),
                                            splits=splits, log=lambda m: None)
                records.append(Record(**common, arm=probe, top1=out["top1"], top5=out["top5"],
                                      predictions=out["predictions"], chosen={"l2": out["l2"]},
                                      selection=out["val_top1_by_l2"], folds=len(splits),
                                      train_time_s=time.perf_counter() - t0 + bank.seconds).to_dict())
                log(f"[exp] {probe} {100 * f:g}% (replicate {rep.index}): L2 {out['l2']:g} chosen on validation, "
                    f"test top-1 {out['top1']:.4f}")
            if kind != "pixels" and ("knn" in plan.baselines or kind == "random"):
                for k in e.knn_ks():
                    out = knn_eval(feats, num_classes=data.num_classes, k=k)
                    name = ("knn" if kind == "ssl" else "random-knn") + f"-{k}"
                    records.append(Record(**common, arm=name, top1=out["top1"], top5=out["top5"],
                                          predictions=out["predictions"], chosen={"k": min(k, len(sub))},
                                          train_time_s=out["wall_time_s"] + bank.seconds).to_dict())
    return records


def ssl_data(plan: Plan, data: EvalData) -> EvalData:
    """The labelled data with the SimCLR encoder's input normalisation (an import's, when it has its own)."""
    if plan.pretrained is None:
        return data
    mean, std = plan.pretrained.mean_std()
    return dataclasses.replace(data, mean=tuple(mean), std=tuple(std))


# ---------------------------------------------------------------------------- trained cells
def run_cell(plan: Plan, cell: Cell, data: EvalData, log: Log) -> dict[str, Any]:
    """The grid on the cell's selection splits (validation only), then the final run of the chosen point."""
    grid, scores, curves, spent = plan.grid(), {}, {}, 0.0
    for lr, wd in grid:
        runs = [run_classifier(arm_config(plan, cell, lr, wd, split=k), data=data, split=plan.split_of(cell, k),
                               log=log) for k in range(cell.folds)]
        scores[(lr, wd)] = float(np.mean([r["score"] for r in runs]))
        curves[(lr, wd)] = [r["curve"] for r in runs]
        spent += sum(r["train_time_s"] for r in runs)
    best = max(grid, key=lambda p: (scores[p], -grid.index(p)))  # ties: the first point of the grid
    final = run_classifier(arm_config(plan, cell, *best, split=None), data=data, split=plan.split_of(cell, None),
                           log=log)
    log(f"[exp] {cell.arm} {100 * cell.fraction:g}% (replicate {cell.rep.index}): chose lr {best[0]:g} wd "
        f"{best[1]:g} (validation top-1 {scores[best]:.4f} over {cell.folds} split(s)); test top-1 "
        f"{final['top1']:.4f}")
    p = final["params"]
    return Record(
        arm=cell.arm, fraction=cell.fraction, replicate=cell.rep.index, subset_seed=cell.rep.subset_seed,
        seed=cell.rep.seed, label_count=final["label_count"], subset_sha256=final["subset_sha256"],
        top1=final["top1"], top5=final["top5"], predictions=final["predictions"],
        chosen={"lr": best[0], "wd": best[1]}, train_time_s=final["train_time_s"],
        selection={f"lr={lr:g},wd={wd:g}": s for (lr, wd), s in scores.items()}, folds=cell.folds,
        curves=curves[best], history=final["history"], steps=p["steps"], epochs=p["steps"] / p["steps_per_epoch"],
        global_batch=p["global_batch"], peak_lr=p["peak_lr"], lr_rule=p["lr_rule"], augment=p["augment"],
        selection_time_s=spent, reused=bool(final.get("cached")), normalization=final.get("normalization"),
        run=final["run"]).to_dict()


def execute(plan: Plan, *, log: Log = emit, on_update=None) -> dict[str, Any]:
    """Run the whole study; ``on_update(plan, records, pretraining, budget, elapsed_s, complete)`` is called after
    every part (the command writes results.json there, and the report at the end)."""
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
    parts = [("probes", rep, None) for rep in plan.replicates] + [("cell", c.rep, c) for c in plan.cells]
    parts.sort(key=lambda p: p[1].index)  # replicate by replicate: an interrupted study has whole replicates
    for i, (kind, rep, cell) in enumerate(parts, 1):
        what = "probes and baselines" if cell is None else f"{cell.arm} at {100 * cell.fraction:g}%"
        log(f"[exp] ({i}/{len(parts)}, {(time.perf_counter() - t_start) / 60:.1f} min) replicate {rep.index} "
            f"(subset seed {rep.subset_seed}, seed {rep.seed}): {what}")
        if cell is None:
            records += run_probes(plan, rep, data, banks, log)
        else:
            records.append(run_cell(plan, cell, data, log))
        if on_update is not None:
            on_update(plan, records, pretraining, budget, time.perf_counter() - t_start, False)
    for r in records:  # the fairness invariant: every arm of a replicate trained on the one drawn subset
        if r["subset_sha256"] != subset_digest(plan.subsets[(r["fraction"], r["subset_seed"])]):
            raise RuntimeError(f"{r['arm']} at {r['fraction']:g} trained on another label subset than the other arms")
    return {"plan": plan, "records": records, "pretraining": pretraining, "budget": budget,
            "elapsed_s": time.perf_counter() - t_start, "data": data}


def write_outputs(out: str, summary: dict[str, Any]) -> None:
    """results.json, results.csv (one row per arm and fraction), report.md and the plots, into ``--out``."""
    storage.write_json(storage.join(out, "results.json"), summary)
    buf = io.StringIO()
    fields = ["arm", "fraction", "label_count", "n", "mean", "sd", "ci_low", "ci_high", "worst_class", "macro_f1",
              "steps", "epochs", "train_time_s"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary.get("rows", []))
    storage.write_bytes(storage.join(out, "results.csv"), buf.getvalue().encode())
    for name, data in plots(summary).items():
        storage.write_bytes(storage.join(out, name), data)
    storage.write_bytes(storage.join(out, "report.md"), report(summary).encode())
