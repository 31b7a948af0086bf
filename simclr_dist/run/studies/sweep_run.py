"""A sweep on Ray Tune: each trial is a whole Ray Train pretraining run, its per-epoch metrics forwarded to Tune.

Why this shape: a Tune function trainable launches the Train run (the Ray >= 2.43 "Train inside Tune" pattern) and
``TuneReportCallback`` forwards every epoch's report, so ASHA sees the objective at its rungs and stops a trial by
ending that trial's Train run. The trial's checkpoints live in shared storage under
``<storage>/<study>/train/<trial_id>``, so a resumed sweep also resumes an interrupted trial mid-run. A trial that
fails at run time (e.g. a non-finite loss) is recorded as failed with its error; the others go on. At the end the
table (every trial, stopped ones included) and the study's plots are written next to the Tune experiment.

Reference rows (:func:`reference_rows`): after the trials the driver scores, on the very split and with the very
code that produce the trials' objective (:func:`~simclr_dist.run.train.pretrain_loop.online_knn`), the raw pixels the
encoder sees and the trials' randomly initialised encoder of every seed (no pretraining). They cost seconds and say
what pretraining added.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from simclr_dist.config import ARCH_FIELDS, PretrainConfig
from simclr_dist.config.sweep import EXPERIMENT_SPEC, OBJECTIVES, ONLINE_OBJECTIVES, SweepError, SweepSpec
from simclr_dist.report.sweep import finite, write_results
from simclr_dist import storage
from simclr_dist.run.jobs.pretrain_job import run as run_pretraining
from simclr_dist.run.studies.sweep_plan import asha_max_t, check_spec, cluster_capacity, describe, plan_concurrency

OFFLINE = tuple(o for o in OBJECTIVES if o not in ONLINE_OBJECTIVES) + ("loss",)  # a column in every table
DRIVER_BUNDLE = {"memory": 256 * 2**20}  # the trial's driver only launches a Train run: no CPU, a little memory


def run_trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """Tune function trainable: one Ray Train run (checkpoints in shared storage, named by the trial id), its
    per-epoch metrics forwarded to Tune. A rerun of the same trial (sweep resume) resumes that Train run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = PretrainConfig.from_dict({**base, **config, "name": tune.get_context().get_trial_id()})
    run_pretraining(cfg, callbacks=[TuneReportCallback()])  # RunError -> Tune records the trial as failed


# ----------------------------------------------------------------------------------------------- results
def error_line(error: BaseException | None) -> str:
    """The exception line of a trial's error (the RunError), not Ray's wrapper text."""
    if error is None:
        return ""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln.split(":")[0] or "Error:" in ln:
            return ln[:400]
    return (lines[-1] if lines else type(error).__name__)[:400]


def collect_rows(spec: SweepSpec, result_grid) -> list[dict[str, Any]]:
    """One row per trial: status, search values, objective (last value reported), epochs, time, error. A trial
    the scheduler stopped keeps its row, with the objective of its last rung and a note."""
    rows = []
    # Tune's Trial objects, in the ResultGrid's order, give each trial's status (unfinished after an interruption)
    trials = list(getattr(getattr(result_grid, "_experiment_analysis", None), "trials", None) or [])
    for n, r in enumerate(result_grid):
        m = r.metrics or {}
        trial = trials[n] if len(trials) == len(result_grid) else None
        trial_id = trial.trial_id if trial else m.get("trial_id") or (Path(r.path).name if r.path else "")
        status = getattr(trial, "status", "TERMINATED")
        df = r.metrics_dataframe

        def last(key, df=df, m=m):
            if df is not None and key in df.columns:
                s = df[key].dropna()
                if len(s):
                    return float(s.iloc[-1])
            return m.get(key)
        row = {"trial": trial_id, "status": "FAILED" if r.error or status == "ERROR" else
               "OK" if status == "TERMINATED" else "UNFINISHED"}
        for k in spec.search:
            row[k] = (r.config or {}).get(k)
        if spec.seeds:
            row["seed"] = (r.config or {}).get("seed")
        try:
            epochs_planned = PretrainConfig.from_dict(spec.trial_dict(dict(r.config or {}))).resolved().epochs
        except Exception:  # noqa: BLE001 - only decides the "stopped early" note
            epochs_planned = None
        row.update({spec.metric: last(spec.metric)})
        if spec.metric not in ONLINE_OBJECTIVES:  # the trial's own encoder before training (what --seed inits)
            row[f"{spec.metric}_init"] = last(f"{spec.metric}_init")
        for extra in OBJECTIVES + ("rankme", "loss"):
            if extra not in row and (last(extra) is not None or extra in OFFLINE):  # online: only where it ran
                row[extra] = last(extra)
        row["epochs_done"] = int(last("epoch")) if last("epoch") is not None else None
        row["time_s"] = m.get("time_total_s")
        row["note"] = ""
        if row["status"] == "OK" and epochs_planned and row["epochs_done"] and row["epochs_done"] < epochs_planned:
            row["note"] = f"stopped early by {(spec.scheduler or {}).get('type', 'the scheduler')}"
        row["error"] = error_line(r.error)
        rows.append(row)
    return sort_rows(spec, rows)


def sort_rows(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first by the objective; failed and unmeasured trials last."""
    sign = -1 if spec.mode == "max" else 1
    return sorted(rows, key=lambda r: (r["status"] != "OK", not finite(r.get(spec.metric)),
                                       sign * (r.get(spec.metric) if finite(r.get(spec.metric)) else 0.0),
                                       str(r["trial"])))


# ----------------------------------------------------------------------------------------------- references
DATA_FIELDS = ("dataset", "data_root", "image_size", "train_subset", "knn_k", "knn_temperature")
REFERENCES = ("pixels", "random-init")


def reference_rows(spec: SweepSpec, cfgs: list[PretrainConfig], log=print) -> list[dict[str, Any]]:
    """The objective (and the other validation accuracies) of (a) the raw pixels the encoder sees (its eval
    transform's image_size x image_size x 3 values, no network) and (b) the trials' network, randomly initialised as a
    trial of that seed initialises it (``torch.manual_seed(seed)`` then ``build_model``), for every seed. Both go
    through the trials' own evaluation (:func:`online_knn`: the sweep's fixed train subset, its stratified 80/20 split,
    the same features' kNN and logistic-regression probe), under a trial worker's thread count and memory format, so
    a reference and a trial differ only in the features (the random-init row of seed s reproduces the trial's own
    ``<objective>_init`` of seed s exactly for a CPU trial on one worker; a GPU or multi-rank trial computes its
    features in another order of float sums, so its ``_init`` differs slightly).
    One row per reference x seed (pixels: one row, it has no seed); ``of`` names what distinguishes a group when the
    trials differ in data or network. None for an online-probe objective (it is trained during pretraining)."""
    import torch

    from simclr_dist.core.precision import use_channels_last
    from simclr_dist.run.store.weights import build_model
    from simclr_dist.run.train.pretrain_loop import online_knn

    if spec.metric in ONLINE_OBJECTIVES:
        log(f"references: none for {spec.metric} (an online probe trains with the encoder)")
        return []
    device = torch.device("cpu")
    rows: list[dict[str, Any]] = []

    def group(fields: tuple[str, ...]) -> dict[tuple, PretrainConfig]:
        out: dict[tuple, PretrainConfig] = {}
        for cfg in cfgs:
            out.setdefault(tuple(repr(getattr(cfg, f)) for f in fields), cfg)
        return out

    def label(cfg: PretrainConfig, fields: tuple[str, ...], groups: dict[tuple, PretrainConfig]) -> str:
        differ = [f for f in fields if len({repr(getattr(c, f)) for c in groups.values()}) > 1]
        return " ".join(f"{f}={getattr(cfg, f)}" for f in differ)

    def score(name: str, encoder: torch.nn.Module, cfg: PretrainConfig, of: str, seed: int | None) -> None:
        threads = torch.get_num_threads()  # a trial's worker's threads and memory format: its float sums, too
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        try:
            acc = online_knn(encoder, cfg, device, channels_last=use_channels_last(cfg.channels_last))
        finally:
            torch.set_num_threads(threads)
        rows.append({"reference": name, "of": of, "seed": seed, **acc})
        log(f"reference {name}{f' ({of})' if of else ''}{'' if seed is None else f' seed {seed}'}: "
            f"{spec.metric} {acc.get(spec.metric, float('nan')):.4f}")

    pixels = group(DATA_FIELDS)
    for cfg in pixels.values():  # (B, 3, H, W) -> (B, 3*H*W): the probe sees the pixels the encoder would
        score("pixels", torch.nn.Flatten(), cfg, label(cfg, DATA_FIELDS, pixels), None)
    nets = group(DATA_FIELDS + tuple(ARCH_FIELDS))
    before = torch.random.get_rng_state()
    try:
        for cfg in nets.values():
            of = label(cfg, DATA_FIELDS + tuple(ARCH_FIELDS), nets)
            for seed in spec.seeds or [cfg.seed]:
                torch.manual_seed(seed)  # as train_worker does before build_trainer builds the model
                score("random-init", build_model(cfg).encoder, cfg, of, seed)
    finally:
        torch.random.set_rng_state(before)
    return rows


# ----------------------------------------------------------------------------------------------- the driver
def check_identity(spec: SweepSpec, saved: dict[str, Any]) -> None:
    """A resume keeps what the sweep was started with (:meth:`SweepSpec.identity`), or a one-line error naming every
    field that changed. A field the saved identity lacks (written before the field existed, e.g. ``seeds``) is None
    there, as it is in a spec that does not set it."""
    now = spec.identity()
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        raise SweepError(f"sweep {spec.experiment_uri} was started with a different {', '.join(diff)}: resume with "
                         "the same file and --set overrides, or choose another study name")


def run_sweep(spec: SweepSpec, *, resume: bool = False, retry_failed: bool = False, dry_run: bool = False,
              max_concurrent: int | None = None, ray_address: str | None = None,
              callbacks: list | None = None, log=print) -> dict[str, Any]:
    """Validate, then run (or resume) the sweep, then score the reference rows; returns {"rows", "references",
    "files", "experiment", "concurrency"}.

    Everything that can fail on bad input fails here, before any trial starts."""
    cfgs = check_spec(spec)
    address = ray_address or os.environ.get("RAY_ADDRESS")
    cap = cluster_capacity(cfgs, address, connect=not dry_run or bool(address))
    concurrency, notes = plan_concurrency(spec, cfgs, cap, max_concurrent)
    log(describe(spec, cfgs, concurrency, notes, cap))
    if dry_run:
        return {"rows": [], "references": [], "files": {}, "experiment": spec.experiment_uri,
                "concurrency": concurrency}

    from ray import tune

    storage.check_writable(spec.storage_path)
    exp = spec.experiment_uri
    exists = tune.Tuner.can_restore(exp)
    spec_uri = storage.join(exp, EXPERIMENT_SPEC)
    if exists and not resume:
        raise SweepError(f"sweep {exp} already exists: pass --resume to continue it, or choose another study name "
                         "(--set study=NAME) or --storage-path")
    if exists and storage.exists(spec_uri):
        check_identity(spec, storage.read_json(spec_uri))
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=spec.trial_base()),
                                    tune.PlacementGroupFactory([DRIVER_BUNDLE]))
    # Each result carries the objective only at kNN epochs; check_spec has already verified it is reported.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if exists:
        log(f"resuming {exp}: finished trials are kept, unfinished ones continue from their last checkpoint"
            + (", failed ones are retried" if retry_failed else ""))
        tuner = tune.Tuner.restore(exp, trainable, resume_unfinished=True, resume_errored=retry_failed)
    else:
        if resume:
            log(f"nothing to resume at {exp}: starting the sweep")
        storage.write_json(spec_uri, spec.identity())
        scheduler = None
        if spec.scheduler:
            sch = spec.scheduler
            from ray.tune.schedulers import ASHAScheduler
            scheduler = ASHAScheduler(time_attr=sch["time_attr"], max_t=asha_max_t(spec, cfgs),
                                      grace_period=sch["grace_period"], reduction_factor=sch["reduction_factor"])
        tuner = tune.Tuner(
            trainable, param_space=spec.param_space(),
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                                        num_samples=spec.num_samples, max_concurrent_trials=concurrency,
                                        trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(name=spec.study, storage_path=spec.storage_path,
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      callbacks=callbacks, verbose=1))
    return {**finish(spec, cfgs, tuner.fit(), log), "experiment": exp, "concurrency": concurrency}


def finish(spec: SweepSpec, cfgs: list[PretrainConfig], result_grid, log=print) -> dict[str, Any]:
    """The trials' rows, the reference rows and the written results: {"rows", "references", "files"}. The references
    run on the driver (its data, its memory): when they fail, one line says why and the table is written without
    them, so the trials' results are never lost to a reference."""
    rows = collect_rows(spec, result_grid)
    try:
        references = reference_rows(spec, cfgs, log)
    except Exception as e:  # noqa: BLE001 - whatever the driver lacks, the trials' table is still written
        reason = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        log(f"references skipped ({type(e).__name__}{': ' + reason[:300] if reason else ''}); the results are "
            "written without them")
        references = []
    return {"rows": rows, "references": references, "files": write_results(spec, rows, references)}
