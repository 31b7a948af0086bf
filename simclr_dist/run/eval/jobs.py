"""What ``simclr_dist.evaluate`` does to a checkpoint, a run or an imported encoder: run the protocols once and keep
each result as a JSON file.

Why files beside the run's checkpoints (``RUN/eval/<checkpoint>/<protocol>.json``, written atomically, where
``--num-to-keep`` pruning does not reach) plus the run's append-only ``RUN/eval/index.jsonl``
(:mod:`simclr_dist.run.eval.store`): an evaluator that watches a run is then idempotent, it can be stopped and
restarted and never evaluates a checkpoint twice, and the history survives the pruning of old checkpoints. The
fine-tuning protocol is the one classifier loop (:mod:`simclr_dist.run.train.classify_loop`) run in this process.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from simclr_dist.config import ConfigError, PretrainConfig
from simclr_dist.config.evaluate import EvalConfig
from simclr_dist.config.supervised import SupervisedConfig
from simclr_dist.console import Log, emit
from simclr_dist.data.datasets import DatasetError
from simclr_dist.data.splits import balanced_subset, label_split
from simclr_dist.run.eval import store as eval_store
from simclr_dist import storage
from simclr_dist.run.store.checkpoint import (
    MANIFEST_FILE,
    UnsafeCheckpointError,
    latest_checkpoint,
    list_complete_checkpoints,
    load_checkpoint,
)
from simclr_dist.run.train.classify_loop import LocalSession, train_classifier
from simclr_dist.run.jobs.classify_job import pretrained_model_config
from simclr_dist.run.train.evaluation import (
    EvalData,
    compute_features,
    finetune_components,
    knn_eval,
    linear_probe_features,
    load_eval_data,
)
from simclr_dist.run.store.pretrained import PretrainedEncoder, load_pretrained
from simclr_dist.run.train.tracking import log_to_run
from simclr_dist.run.store.weights import build_model

RESULTS_DIR = "eval"
RESULT_FORMAT = 1


def result_name(protocol: str, fraction: float | None = None, queries: str = "test") -> str:
    """``linear``, ``linear-0.01``, ``knn``, ``finetune-0.1``; ``-val`` when linear/kNN are scored on the validation
    queries (fine-tuning always reads the test split once, whatever ``--queries`` says)."""
    name = protocol if fraction is None else f"{protocol}-{fraction:g}"
    return name + ("-val" if queries == "val" and protocol != "finetune" else "")


def result_names(pairs, ecfg: EvalConfig) -> str:
    """The result names of (protocol, fraction) pairs, for log lines."""
    return ", ".join(result_name(*p, ecfg.queries) for p in pairs)


def result_uri(out_dir: str, name: str) -> str:
    """A result file in ``out_dir``: a checkpoint's ``RUN/eval/<checkpoint>/`` or ``--results-dir``'s ``eval/``."""
    return storage.join(out_dir, f"{name}.json")


def planned_results(ecfg: EvalConfig) -> list[tuple[str, float | None]]:
    """(protocol, label fraction) of every result file the config asks for."""
    plan: list[tuple[str, float | None]] = []
    for p in ecfg.protocol_list():
        if p == "finetune":
            plan += [(p, f) for f in ecfg.label_fractions_list()]
        elif p == "linear":  # all labels keeps the historical name "linear"
            plan += [(p, None if f == 1.0 else f) for f in ecfg.linear_fractions_list()]
        else:
            plan.append((p, None))
    return plan


def cached_results(out_uri: str, ecfg: EvalConfig) -> tuple[list, dict, list]:
    """(plan, results already on disk, protocols still to run) of the result files under ``out_uri``/eval/."""
    plan, results, todo = planned_results(ecfg), {}, []
    for protocol, fraction in plan:
        uri = result_uri(out_uri, result_name(protocol, fraction, ecfg.queries))
        if not ecfg.force and storage.exists(uri):
            results[(protocol, fraction)] = {**storage.read_json(uri), "cached": True}
        else:
            todo.append((protocol, fraction))
    return plan, results, todo


def finetune(encoder: nn.Module, data: EvalData, mcfg: PretrainConfig, ecfg: EvalConfig, fraction: float, *,
             device: torch.device, log: Log = emit) -> dict[str, Any]:
    """The paper's fine-tuning (whole network + a new head, SGD Nesterov, no weight decay, cosine from
    ``lr * batch / 256``) of ``encoder`` in place on a class-balanced ``fraction``; the test split is read once."""
    t0 = time.perf_counter()
    scfg = SupervisedConfig(
        dataset=data.dataset, image_size=data.image_size, arch=mcfg.arch, width=mcfg.width, cifar_stem=mcfg.cifar_stem,
        fraction=fraction, subset_seed=ecfg.seed, seed=ecfg.seed, epochs=ecfg.epochs_for(fraction, data.dataset),
        batch_size=ecfg.finetune_batch_size, lr=ecfg.lr_for(data.dataset), weight_decay=0.0,
        augment=finetune_components(data.dataset), eval_batch_size=ecfg.batch_size,
        loader_workers=ecfg.loader_workers, ray=False).validate()
    split = label_split(data.train_labels, fraction=fraction, subset_seed=ecfg.seed, val_split=None)
    out = train_classifier(scfg, mcfg, LocalSession(None, device=device), split, data=data, encoder=encoder, log=log)
    return {"top1": out["top1"], "top5": out["top5"], "label_fraction": fraction,
            "label_count": len(out["subset_indices"]), "test_size": out["test_size"], "history": out["history"],
            "subset_indices": out["subset_indices"], "predictions": out["predictions"],
            "wall_time_s": time.perf_counter() - t0,
            "params": {"fraction": fraction, "epochs": out["epochs"], "steps": out["steps"],
                       "batch_size": out["global_batch"], "lr_per_256": scfg.lr, "peak_lr": out["peak_lr"],
                       "momentum": scfg.momentum, "nesterov": True, "weight_decay": 0.0, "schedule": "cosine",
                       "augment": scfg.augment, "seed": ecfg.seed}}


def run_protocols(encoder: nn.Module, data: EvalData, mcfg: PretrainConfig, ecfg: EvalConfig,
                  todo: Sequence[tuple[str, float | None]], *, out_uri: str, common: dict[str, Any],
                  device: torch.device, log: Log = emit) -> dict[tuple[str, float | None], dict[str, Any]]:
    """Run ``todo`` on ``encoder`` (frozen, or a fine-tuned copy) and write each result to ``out_uri``/eval/."""
    results = {}
    features = None
    if any(p in ("linear", "knn") for p, _ in todo):
        features = compute_features(encoder, data, device=device, batch_size=ecfg.batch_size,
                                    num_workers=ecfg.loader_workers, queries=ecfg.queries, log=log)
    for protocol, fraction in todo:
        if protocol == "linear":
            fit = features if fraction is None else features.subset(
                balanced_subset(features.train_y.numpy(), fraction, ecfg.seed))
            out = linear_probe_features(fit, num_classes=data.num_classes, l2_grid=ecfg.l2_values(),
                                        val_fraction=ecfg.val_fraction, seed=ecfg.seed,
                                        max_iter=ecfg.linear_max_iter, device=device, log=log)
            out.update(label_fraction=fraction or 1.0, queries=ecfg.queries)
        elif protocol == "knn":
            out = knn_eval(features, num_classes=data.num_classes, k=ecfg.knn_k, temperature=ecfg.knn_temperature)
            out.update(queries=ecfg.queries)
            log(f"[eval] kNN (k={ecfg.knn_k}): {ecfg.queries} top-1 {out['top1']:.4f}")
        else:
            out = finetune(copy.deepcopy(encoder), data, mcfg, ecfg, fraction, device=device, log=log)
        result = {**common, "protocol": protocol, **out,
                  "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        storage.write_json(result_uri(out_uri, result_name(protocol, fraction, ecfg.queries)), result)
        results[(protocol, fraction)] = {**result, "cached": False}
    return results


def evaluate_checkpoint(checkpoint_uri: str, ecfg: EvalConfig, *, device: torch.device | str = "cpu",
                        log: Log = emit) -> list[dict[str, Any]]:
    """Run the config's protocols on one checkpoint and write each result next to it; a result whose file exists
    is read back instead (unless ``force``), which makes watching idempotent."""
    device = torch.device(device)
    out_dir = eval_store.results_dir(checkpoint_uri)
    plan, results, todo = cached_results(out_dir, ecfg)
    if not todo:
        log(f"[eval] {checkpoint_uri}: already evaluated ({result_names(plan, ecfg)}); skipping")
        # after a crash in between
        eval_store.record(checkpoint_uri, {result_name(*p, ecfg.queries): results[p] for p in plan})
        return [results[p] for p in plan]
    state = load_checkpoint(checkpoint_uri, map_location="cpu")
    cfg = PretrainConfig.from_dict(state["config"])
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    data = load_eval_data(cfg, ecfg.data_root)
    common = {"format_version": RESULT_FORMAT, "checkpoint": checkpoint_uri, "checkpoint_epoch": state["epoch"],
              "checkpoint_step": state["step"],  # and the pretraining seconds that made it (curves against time)
              "checkpoint_train_s": sum(h.get("epoch_time_s", 0.0) for h in state.get("history", [])),
              "dataset": cfg.dataset, "arch": cfg.arch_signature(), "image_size": cfg.image_size, "device": device.type}
    log(f"[eval] {checkpoint_uri}: epoch {state['epoch']} of {cfg.arch} x{cfg.width} on {cfg.dataset}; "
        f"running {result_names(todo, ecfg)} on {device.type}")
    results.update(run_protocols(model.encoder.to(device), data, cfg, ecfg, todo, out_uri=out_dir,
                                 common=common, device=device, log=log))
    eval_store.record(checkpoint_uri, {result_name(*p, ecfg.queries): results[p] for p in plan})
    track_results(checkpoint_uri, {result_name(*p, ecfg.queries): results[p] for p in todo}, state["step"], log)
    return [results[p] for p in plan]


def track_results(checkpoint_uri: str, fresh: dict[str, dict[str, Any]], step: int, log: Log) -> None:
    """The new results of a run's checkpoint, into that run's tracking (TensorBoard / MLflow) at the checkpoint's
    step, as ``eval/<result>/top1`` and ``top5``: the curves of a run and of its evaluations in one place."""
    metrics = {f"eval/{name}/{k}": float(r[k]) for name, r in fresh.items() for k in ("top1", "top5")
               if isinstance(r.get(k), (int, float))}
    kinds = log_to_run(checkpoint_uri.rstrip("/").rsplit("/", 1)[0], metrics, step)  # RUN/checkpoint_x -> RUN
    if kinds:
        log(f"[eval] logged {len(metrics)} value(s) at step {step} to the run's {' and '.join(kinds)} tracking")


def pretrained_eval_data(pre: PretrainedEncoder, ecfg: EvalConfig) -> tuple[EvalData, PretrainConfig]:
    """The labelled splits of ``--dataset`` (default: a simclr-dist checkpoint's own) at ``--image-size``, with
    the input normalisation the importer recorded instead of the dataset's (SimCLR v1: identity on [0, 1])."""
    mcfg = pretrained_model_config(pre, dataset=ecfg.dataset, image_size=ecfg.image_size, data_root=None)
    mean, std = pre.mean_std()
    return dataclasses.replace(load_eval_data(mcfg, ecfg.data_root), mean=mean, std=std), mcfg


def pretrained_results_dir(pre: PretrainedEncoder, data: EvalData, ecfg: EvalConfig) -> str:
    """The directory of the result files: ``--results-dir``/eval; by default a simclr-dist checkpoint evaluated on
    its own data and resolution shares the results of ``--checkpoint`` (``RUN/eval/<checkpoint>/``), other data go
    to ``RUN/eval/<checkpoint>/transfer/<dataset>-<size>px``, and external files to
    ``./runs/pretrained-eval/<format>-<file>-<dataset>-<size>px/eval``."""
    if ecfg.results_dir:
        return storage.join(ecfg.results_dir, RESULTS_DIR)
    tag = f"{data.dataset}-{data.image_size}px"
    own = (pre.checkpoint or {}).get("config")
    if own is not None:
        if own.get("dataset") == data.dataset and own.get("image_size") == data.image_size:
            return eval_store.results_dir(pre.uri)
        return storage.join(eval_store.results_dir(pre.uri), "transfer", tag)
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in pre.uri.rstrip("/").rsplit("/", 1)[-1])
    return os.path.join(os.path.abspath(os.path.join("runs", "pretrained-eval", f"{pre.format}-{name}-{tag}")),
                        RESULTS_DIR)


def evaluate_pretrained(spec: str, ecfg: EvalConfig, *, device: torch.device | str = "cpu",
                        log: Log = emit) -> list[dict[str, Any]]:
    """Import ``FORMAT:PATH_OR_URI`` (verified; ``ecfg.strict`` refuses partial loads), print what was loaded,
    and run the config's protocols on ``ecfg.dataset`` with the importer's input normalisation."""
    device = torch.device(device)
    pre = load_pretrained(spec, strict=ecfg.strict, log=log)
    data, mcfg = pretrained_eval_data(pre, ecfg)
    out_uri = pretrained_results_dir(pre, data, ecfg)
    plan, results, todo = cached_results(out_uri, ecfg)
    if not todo:
        log(f"[eval] {pre.source} on {data.dataset}: already evaluated ({result_names(plan, ecfg)}) "
            f"in {out_uri}; skipping")
        return [results[p] for p in plan]
    own = (pre.checkpoint or {}).get("config")
    arch = (PretrainConfig.from_dict(own).arch_signature() if own else
            {"arch": pre.arch, "width": pre.width, "cifar_stem": pre.cifar_stem})
    common = {"format_version": RESULT_FORMAT, "checkpoint": pre.uri if own else pre.source,
              "checkpoint_epoch": pre.epoch, "checkpoint_step": (pre.checkpoint or {}).get("step"),
              "dataset": data.dataset, "arch": arch, "image_size": data.image_size, "device": device.type,
              "pretrained": pre.summary()}
    log(f"[eval] {pre.source} on {data.dataset} {data.image_size}px (input normalisation: "
        f"{pre.normalization_text()}): running {result_names(todo, ecfg)} on {device.type}; "
        f"results in {out_uri}")
    results.update(run_protocols(pre.encoder.to(device), data, mcfg, ecfg, todo, out_uri=out_uri, common=common,
                                 device=device, log=log))
    return [results[p] for p in plan]


def evaluate_latest(run_uri: str, ecfg: EvalConfig, *, device: torch.device | str = "cpu",
                    log: Log = emit) -> list[dict[str, Any]]:
    latest = latest_checkpoint(run_uri)
    if latest is None:
        raise ConfigError(f"--run {run_uri}: no complete checkpoint (checkpoint_*/ with {MANIFEST_FILE}) yet")
    return evaluate_checkpoint(latest, ecfg, device=device, log=log)


def watch_run(run_uri: str, ecfg: EvalConfig, *, device: torch.device | str = "cpu", log: Log = emit,
              sleep: Callable[[float], None] = time.sleep) -> list[dict[str, Any]]:
    """Poll the run every ``ecfg.interval`` s and evaluate each complete checkpoint once, oldest first, until one
    of epoch >= ``watch_until_epoch`` is evaluated (or forever). A checkpoint that fails to load (deleted under
    ``num_to_keep``, or its bytes still arriving) is retried at the next poll."""
    done: set[str] = set()
    results: list[dict[str, Any]] = []
    log(f"[eval] watching {run_uri} every {ecfg.interval:g}s"
        + (f" until epoch {ecfg.watch_until_epoch}" if ecfg.watch_until_epoch is not None else " (Ctrl-C stops)"))
    while True:
        for ref in list_complete_checkpoints(run_uri):
            if ref.uri in done:
                continue
            try:
                results += evaluate_checkpoint(ref.uri, ecfg, device=device, log=log)
            except (DatasetError, ConfigError):
                raise
            except UnsafeCheckpointError as e:  # holds pickled objects: never loaded, never retried
                log(f"[eval] {ref.uri}: skipped ({str(e).splitlines()[0]})")
                done.add(ref.uri)
                continue
            except (ValueError, OSError) as e:  # checksum mismatch, deleted or unreachable files
                log(f"[eval] {ref.uri}: not readable now ({str(e).splitlines()[0]}); retrying at the next poll")
                continue
            done.add(ref.uri)
            if ecfg.watch_until_epoch is not None and ref.epoch >= ecfg.watch_until_epoch:
                return results
        sleep(ecfg.interval)
