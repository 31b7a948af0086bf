"""``python -m simclr_dist.sweep tune/<study>.yaml``: SimCLR ablations (paper Fig. 5, Fig. 9, Table 5) on Ray Tune.

A sweep file is data: the pretraining fields every trial shares (``base``), the ``search`` space over pretraining
fields, the ``objective`` (a held-out accuracy the trainable reports, never the test split), the ``scheduler``
(ASHA or none), the ``resources`` of one trial (Ray Train workers) and the ``concurrency``. Each trial is a whole
Ray Train run launched from a Tune function trainable (the Ray >= 2.43 "Train inside Tune" pattern), its per-epoch
metrics forwarded to Tune by ``TuneReportCallback``; the trial's checkpoints live in shared storage under
``<storage>/<study>/train/<trial_id>`` so a resumed sweep also resumes an interrupted trial mid-run.

Everything that can be wrong with the input (an unknown field, an unknown augmentation, an objective the trainable
does not report, a trial bigger than the cluster) is reported as one line before any trial starts. A trial that fails
at run time (e.g. a non-finite loss) is recorded as failed with its error; the others go on. At the end the driver
writes ``results.csv``, ``results.md`` and the study's plots (PNG) next to the Tune experiment.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import io
import itertools
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from simclr_dist.run import storage
from simclr_dist.config import ConfigError, PretrainConfig, base_type, is_uri
from simclr_dist.data.augment import COMPONENTS, parse_components
from simclr_dist.data.datasets import DatasetError

SECTIONS = ("study", "description", "base", "search", "objective", "scheduler", "resources", "concurrency",
            "num_samples", "storage_path")
RESOURCE_FIELDS = ("num_workers", "cpus_per_worker", "use_gpu")
# Set by the sweep for every trial (each trial is its own Train run; the monitor always uses the validation split).
CONTROLLED_FIELDS = {"storage_path": "--storage-path", "name": "the trial id", "ray_address": "--ray-address",
                     "summary_json": "the results table", "knn_split": "the sweep (always 'val')",
                     "verbose": "the sweep"}
OBJECTIVES = ("val_knn_top1", "val_knn_top5")  # held-out accuracies the trainable reports (kNN on the val split)
SCHEDULERS = ("none", "asha")
ASHA_KEYS = ("type", "time_attr", "max_t", "grace_period", "reduction_factor")
DIMENSION_KINDS = ("grid", "choice", "uniform", "loguniform", "pairs")
DRIVER_BUNDLE = {"memory": 256 * 2**20}  # the trial's driver only launches a Train run: no CPU, a little memory
EXPERIMENT_SPEC = "sweep.json"
TRAIN_DIR = "train"


class SweepError(ConfigError):
    """A bad sweep file, override or command; one line naming the culprit."""


# ----------------------------------------------------------------------------------------------- the spec
@dataclass
class Dimension:
    kind: str                 # grid | choice | uniform | loguniform (pairs expands to a grid of "a,b" strings)
    values: list[Any]         # grid/choice: the values; uniform/loguniform: [low, high]
    components: tuple[str, ...] = ()  # pairs: the components whose pairs (and singles) make the grid

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    def describe(self) -> str:
        return f"{self.kind}({self.values[0]:g}, {self.values[1]:g})" if self.kind in ("uniform", "loguniform") \
            else f"{self.kind}{self.values}"


@dataclass
class SweepSpec:
    study: str
    source: str
    description: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Dimension] = field(default_factory=dict)
    metric: str = "val_knn_top1"
    mode: str = "max"
    scheduler: dict[str, Any] | None = None
    resources: dict[str, Any] = field(default_factory=lambda: {"num_workers": 1, "cpus_per_worker": 1.0,
                                                               "use_gpu": None})
    concurrency: int = 1
    num_samples: int = 1
    storage_path: str = "./runs/sweeps"

    # -- derived
    @property
    def experiment_uri(self) -> str:
        return storage.join(self.storage_path, self.study)

    @property
    def train_storage(self) -> str:
        return storage.join(self.experiment_uri, TRAIN_DIR)

    def identity(self) -> dict[str, Any]:
        """What a resume must keep (concurrency and storage may change)."""
        return json.loads(json.dumps({
            "base": self.base, "search": {k: dataclasses.asdict(d) for k, d in self.search.items()},
            "metric": self.metric, "mode": self.mode, "scheduler": self.scheduler, "resources": self.resources,
            "num_samples": self.num_samples}, default=list))

    def trial_configs(self) -> list[dict[str, Any]]:
        """The search-space points of every trial (grid product x num_samples); random dimensions stay symbolic."""
        grid_keys = [k for k, d in self.search.items() if d.is_grid]
        points = []
        for _ in range(self.num_samples):
            for combo in itertools.product(*(self.search[k].values for k in grid_keys)):
                point = dict(zip(grid_keys, combo))
                point.update({k: d for k, d in self.search.items() if not d.is_grid})
                points.append(point)
        return points

    def param_space(self) -> dict[str, Any]:
        from ray import tune
        space = {}
        for k, d in self.search.items():
            space[k] = {"grid": lambda v: tune.grid_search(v), "choice": lambda v: tune.choice(v),
                        "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}[d.kind](
                list(d.values))
        return space

    def trial_dict(self, point: dict[str, Any]) -> dict[str, Any]:
        """The PretrainConfig fields of one trial (before the trial id names its run)."""
        return {**self.base, **self.resources, **point, "knn_split": "val", "storage_path": self.train_storage,
                "name": "trial"}


def _fail(where: str, msg: str) -> typing.NoReturn:
    raise SweepError(f"{where}: {msg}")


_HINTS = typing.get_type_hints(PretrainConfig)
_FIELDS = {f.name for f in dataclasses.fields(PretrainConfig)}


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_field(where: str, key: str, *, allow_resources: bool = False) -> None:
    if key not in _FIELDS:
        _fail(where, f"unknown parameter {key!r}: not a pretraining field{_suggest(key, _FIELDS)} "
                     "(python -m simclr_dist.pretrain --help lists them)")
    if key in CONTROLLED_FIELDS:
        _fail(where, f"{key!r} is set by {CONTROLLED_FIELDS[key]}, not by the sweep file")
    if key in RESOURCE_FIELDS and not allow_resources:
        _fail(where, f"{key!r} is a per-trial resource: set it under 'resources' (it cannot vary across trials)")


def _coerce(where: str, key: str, value: Any) -> Any:
    """A YAML value as the field's type (int for float is fine; bool is never a number), or a one-line error."""
    tp, optional = base_type(_HINTS[key])
    if value is None:
        if optional:
            return None
        _fail(where, f"{key} must be a {tp.__name__}, got null")
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        _fail(where, f"{key} must be a {tp.__name__}, got {value!r}")
    return value


def _parse_dimension(where: str, key: str, raw: Any) -> Dimension:
    if isinstance(raw, list):
        raw = {"grid": raw}
    if not isinstance(raw, dict) or len(raw) != 1:
        _fail(where, f"a search dimension is a list of values or one of {{{', '.join(DIMENSION_KINDS)}: ...}}, "
                     f"got {raw!r}")
    (kind, values), = raw.items()
    if kind not in DIMENSION_KINDS:
        _fail(where, f"unknown kind {kind!r}; choose from {', '.join(DIMENSION_KINDS)}"
                     f"{_suggest(kind, DIMENSION_KINDS)}")
    if not isinstance(values, list) or not values:
        _fail(where, f"{kind} needs a non-empty list, got {values!r}")
    if kind == "pairs":
        if key != "augment":
            _fail(where, "'pairs' makes augmentation pairs: use it for 'augment' only")
        comps = []
        for name in values:
            try:
                (c,) = parse_components(str(name)) or (None,)
            except ValueError as e:
                _fail(where, str(e))
            if c is None:
                _fail(where, f"{name!r} is not one augmentation component")
            comps.append(c)
        singles = [c for c in comps]
        pairs = [f"{a},{b}" for a, b in itertools.combinations(comps, 2)]
        return Dimension("grid", singles + pairs, tuple(comps))
    if kind in ("uniform", "loguniform"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            _fail(where, f"{kind} needs [low, high] numbers, got {values!r}")
        lo, hi = (float(v) for v in values)
        if not lo < hi or (kind == "loguniform" and lo <= 0):
            _fail(where, f"{kind} needs 0 {'<' if kind == 'loguniform' else '<='} low < high, got {values!r}")
        if base_type(_HINTS[key])[0] is not float:
            _fail(where, f"{kind} draws floats; {key} is a {base_type(_HINTS[key])[0].__name__}: use a grid")
        return Dimension(kind, [lo, hi])
    vals = [_coerce(where, key, v) for v in values]
    if key == "augment":  # canonical form, so the heatmap and the table name each policy once
        try:
            vals = [",".join(parse_components(v)) if v is not None else None for v in vals]
        except ValueError as e:
            _fail(where, str(e))
    if len({json.dumps(v) for v in vals}) != len(vals):
        _fail(where, f"duplicate values in {vals!r} (repeat trials with a 'seed' dimension)")
    return Dimension(kind, vals)


def _parse_scheduler(where: str, raw: Any) -> dict[str, Any] | None:
    if raw is None or raw == "none" or raw == {"type": "none"}:
        return None
    if raw == "asha":
        raw = {"type": "asha"}
    if not isinstance(raw, dict):
        _fail(where, f"'none', 'asha' or a mapping with type: asha, got {raw!r}")
    if raw.get("type") not in SCHEDULERS:
        _fail(where, f"unknown scheduler type {raw.get('type')!r}; choose from {', '.join(SCHEDULERS)}")
    if raw["type"] == "none":
        if len(raw) > 1:
            _fail(where, f"scheduler none takes no parameters, got {sorted(set(raw) - {'type'})}")
        return None
    for k in raw:
        if k not in ASHA_KEYS:
            _fail(f"{where}.{k}", f"unknown ASHA parameter{_suggest(k, ASHA_KEYS)}; choose from {', '.join(ASHA_KEYS)}")
    out = {"type": "asha", "time_attr": raw.get("time_attr", "epoch"), "max_t": raw.get("max_t"),
           "grace_period": raw.get("grace_period", 1), "reduction_factor": raw.get("reduction_factor", 2)}
    for k in ("max_t", "grace_period"):
        if out[k] is not None and (not isinstance(out[k], int) or isinstance(out[k], bool) or out[k] < 1):
            _fail(f"{where}.{k}", f"must be an integer >= 1, got {out[k]!r}")
    rf = out["reduction_factor"]
    if not isinstance(rf, (int, float)) or isinstance(rf, bool) or rf <= 1:
        _fail(f"{where}.reduction_factor", f"must be > 1, got {rf!r}")
    if out["max_t"] is not None and out["grace_period"] > out["max_t"]:
        _fail(f"{where}.grace_period", f"{out['grace_period']} exceeds max_t {out['max_t']}")
    return out


def parse_spec(data: Any, source: str = "<sweep>", overrides: typing.Sequence[str] = ()) -> SweepSpec:
    """Parse (and apply ``--set`` overrides to) a sweep mapping; raises :class:`SweepError`."""
    if not isinstance(data, dict):
        _fail(source, "a sweep file is a mapping with sections " + ", ".join(SECTIONS))
    data = json.loads(json.dumps(data))  # a deep copy (YAML scalars only)
    for k in data:
        if k not in SECTIONS:
            _fail(f"{source}: {k}", f"unknown section{_suggest(k, SECTIONS)}; choose from {', '.join(SECTIONS)}")
    for section in ("base", "search", "objective", "resources"):
        data.setdefault(section, {})
        if data[section] is None:
            data[section] = {}
        if not isinstance(data[section], dict):
            _fail(f"{source}: {section}", f"must be a mapping, got {data[section]!r}")
    for item in overrides:
        _apply_override(data, item)

    study = data.get("study") or Path(source).stem
    if not isinstance(study, str) or not study or "/" in study or study.startswith("."):
        _fail(f"{source}: study", f"must be a plain directory name, got {study!r}")
    spec = SweepSpec(study=study, source=source, description=str(data.get("description") or ""))
    for k, v in data["base"].items():
        _check_field(f"{source}: base.{k}", k)
        spec.base[k] = _coerce(f"{source}: base.{k}", k, v)
    for k in ("data_root", "beton"):  # trials run in Tune's trial directories: make a relative path absolute here
        v = spec.base.get(k)
        if isinstance(v, str) and v and not is_uri(v) and not v.startswith("~") and "," not in v:
            spec.base[k] = os.path.abspath(v)
    for k, v in data["search"].items():
        _check_field(f"{source}: search.{k}", k)
        spec.search[k] = _parse_dimension(f"{source}: search.{k}", k, v)
        spec.base.pop(k, None)
    for k, v in data["resources"].items():
        if k not in RESOURCE_FIELDS:
            _fail(f"{source}: resources.{k}", f"unknown resource{_suggest(k, RESOURCE_FIELDS)}; choose from "
                                               f"{', '.join(RESOURCE_FIELDS)}")
        spec.resources[k] = _coerce(f"{source}: resources.{k}", k, v)
    obj = data["objective"]
    for k in obj:
        if k not in ("metric", "mode"):
            _fail(f"{source}: objective.{k}", "unknown key; the objective has 'metric' and 'mode'")
    spec.metric, spec.mode = obj.get("metric", spec.metric), obj.get("mode", spec.mode)
    if spec.mode not in ("max", "min"):
        _fail(f"{source}: objective.mode", f"must be max or min, got {spec.mode!r}")
    spec.scheduler = _parse_scheduler(f"{source}: scheduler", data.get("scheduler"))
    for k in ("concurrency", "num_samples"):
        v = data.get(k, getattr(spec, k))
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            _fail(f"{source}: {k}", f"must be an integer >= 1, got {v!r}")
        setattr(spec, k, v)
    sp = data.get("storage_path", spec.storage_path)
    if not isinstance(sp, str) or not sp:
        _fail(f"{source}: storage_path", f"must be a path or URI, got {sp!r}")
    spec.storage_path = sp if is_uri(sp) else os.path.abspath(os.path.expanduser(sp))
    if not spec.search:
        _fail(f"{source}: search", "is empty: a sweep needs at least one dimension")
    return spec


def _apply_override(data: dict[str, Any], item: str) -> None:
    """``key=value`` (value parsed as YAML): a pretraining field (a list makes it a grid dimension, a scalar fixes
    it), a resource, a top-level setting (concurrency, num_samples, scheduler, storage_path) or a dotted
    ``objective.metric`` / ``scheduler.grace_period``."""
    where = f"--set {item}"
    if "=" not in item:
        _fail(where, "expected key=value")
    key, text = item.split("=", 1)
    key = key.strip().replace("-", "_")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        _fail(where, f"value is not valid YAML ({str(e).splitlines()[0]})")
    head, _, sub = key.partition(".")
    if sub:
        if head not in ("objective", "scheduler", "base", "search", "resources"):
            _fail(where, f"unknown parameter {key!r}")
        section = data.get(head)
        if head == "scheduler" and not isinstance(section, dict):
            section = {"type": section or "none"} if section not in (None, "none") else {"type": "none"}
        section = dict(section or {})
        section[sub] = value
        if head == "search":
            data.setdefault("base", {}).pop(sub, None)
        data[head] = section
        return
    if key in ("concurrency", "num_samples", "scheduler", "storage_path", "study", "description"):
        data[key] = value
    elif key in RESOURCE_FIELDS:
        data["resources"][key] = value
    elif key in _FIELDS:
        if isinstance(value, (list, dict)):
            data["search"][key] = value
            data["base"].pop(key, None)
        else:
            data["search"].pop(key, None)
            data["base"][key] = value
    else:
        _fail(where, f"unknown parameter {key!r}{_suggest(key, list(_FIELDS) + list(SECTIONS))}")


def load_spec(path: str, overrides: typing.Sequence[str] = ()) -> SweepSpec:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SweepError(f"{path}: cannot read the sweep file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_spec(data, path, overrides)


# ----------------------------------------------------------------------------------------------- checks
def reported_metrics(cfg: PretrainConfig) -> set[str]:
    """What ``train_loop_per_worker`` reports every epoch (plus the kNN monitor where it runs)."""
    out = {"epoch", "step", "loss", "lr", "samples_per_s", "worker_samples_per_s", "epoch_time_s", "data_wait_s",
           "world_size", "training_iteration"}
    if cfg.knn_every >= 0:
        prefix = "val_" if cfg.knn_split == "val" else ""
        out |= {f"{prefix}knn_top1", f"{prefix}knn_top5"}
    return out


def _point_label(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={v.describe() if isinstance(v, Dimension) else v}" for k, v in point.items())


def check_spec(spec: SweepSpec) -> list[PretrainConfig]:
    """Every trial's resolved config, validated (flags, data, objective, scheduler), or one :class:`SweepError`."""
    from simclr_dist.pretrain import check_config

    cfgs = []
    for i, point in enumerate(spec.trial_configs()):
        # a random dimension is checked at both ends of its range
        randoms = {k: d for k, d in point.items() if isinstance(d, Dimension)}
        variants = [{**point, **{k: d.values[j] for k, d in randoms.items()}} for j in ((0, 1) if randoms else (0,))]
        for variant in variants:
            label = f"{spec.source}: trial {i + 1} ({_point_label(variant)})"
            try:
                cfg = check_config(PretrainConfig.from_dict(spec.trial_dict(variant)))
            except (ConfigError, DatasetError) as e:
                raise SweepError(f"{label}: {e}") from None
            except (TypeError, ValueError) as e:
                raise SweepError(f"{label}: {type(e).__name__}: {e}") from None
        cfgs.append(cfg)
    cfg = cfgs[0]
    reported = reported_metrics(cfg)
    if cfg.knn_every < 0:
        _fail(f"{spec.source}: knn_every", "-1 turns off the kNN monitor the objective is measured with")
    if spec.metric not in reported:
        _fail(f"{spec.source}: objective.metric", f"the trainable does not report {spec.metric!r}"
                                                   f"{_suggest(spec.metric, reported)}; it reports "
                                                   f"{', '.join(sorted(reported))}")
    if spec.metric not in OBJECTIVES:
        _fail(f"{spec.source}: objective.metric", f"{spec.metric!r} is not an accuracy on the held-out validation "
                                                   f"split; a sweep selects on one of {', '.join(OBJECTIVES)}")
    if spec.scheduler:
        sch = spec.scheduler
        where = f"{spec.source}: scheduler"
        if sch["time_attr"] not in reported:
            _fail(f"{where}.time_attr", f"the trainable does not report {sch['time_attr']!r}; use epoch")
        max_epochs = max(c.epochs for c in cfgs)
        if sch["max_t"] is not None and sch["max_t"] > max_epochs and sch["time_attr"] == "epoch":
            _fail(f"{where}.max_t", f"{sch['max_t']} exceeds the trials' {max_epochs} epochs")
        if min(c.knn_every for c in cfgs) == 0:
            _fail(where, "ASHA compares trials at its rungs, but knn_every 0 measures the objective only after the "
                         "last epoch: set knn_every (e.g. to the grace period)")
    return cfgs


def trial_resources(cfg: PretrainConfig, cluster_gpus: float | None) -> dict[str, float]:
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else bool(cluster_gpus)
    need = {"CPU": cfg.num_workers * cfg.cpus_per_worker}
    if use_gpu:
        need["GPU"] = float(cfg.num_workers)
    return need


def plan_concurrency(spec: SweepSpec, cfgs: list[PretrainConfig], cluster: dict[str, float] | None,
                     max_concurrent: int | None) -> tuple[int, list[str]]:
    """(trials at once, notes); raises :class:`SweepError` when a trial needs more than the cluster has."""
    limit = min(spec.concurrency, max_concurrent or spec.concurrency)
    notes = [f"sweep file {spec.concurrency}" + (f", --max-concurrent {max_concurrent}" if max_concurrent else "")]
    if cluster is None:
        return limit, notes + ["cluster not checked (no Ray connection: pass --ray-address or set RAY_ADDRESS)"]
    fits = math.inf
    for i, cfg in enumerate(cfgs):
        need = trial_resources(cfg, cluster.get("GPU", 0))
        for res, amount in need.items():
            have = cluster.get(res, 0.0)
            if amount > have:
                raise SweepError(
                    f"{spec.source}: trial {i + 1} needs {amount:g} {res} ({cfg.num_workers} Ray Train worker(s) x "
                    f"{cfg.cpus_per_worker:g} CPU{' + 1 GPU' if 'GPU' in need else ''}); the Ray cluster has "
                    f"{have:g} {res}: lower resources.num_workers/cpus_per_worker or use a bigger cluster")
            fits = min(fits, int(have // amount) if amount else math.inf)
    if fits < limit:
        notes.append(f"the cluster fits {fits} at once")
        limit = int(fits)
    return max(1, limit), notes


# ----------------------------------------------------------------------------------------------- the trial
def run_trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """Tune function trainable: one Ray Train run (checkpoints in shared storage, named by the trial id), its
    per-epoch metrics forwarded to Tune. A rerun of the same trial (sweep resume) resumes that Train run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from simclr_dist import pretrain

    cfg = PretrainConfig.from_dict({**base, **config, "name": tune.get_context().get_trial_id()})
    pretrain.run(cfg, callbacks=[TuneReportCallback()])  # RunError -> Tune records the trial as failed


# ----------------------------------------------------------------------------------------------- results
def _error_line(error: BaseException | None) -> str:
    if error is None:
        return ""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for ln in reversed(lines):  # the RunError/exception line, not Ray's wrapper text
        if "Error" in ln.split(":")[0] or "Error:" in ln:
            return ln[:400]
    return (lines[-1] if lines else type(error).__name__)[:400]


def collect_rows(spec: SweepSpec, result_grid) -> list[dict[str, Any]]:
    """One row per trial: status, search values, objective (last value reported), epochs, time, error."""
    rows = []
    # Tune's Trial objects, in the ResultGrid's order, give each trial's status (unfinished after an interruption)
    trials = list(getattr(getattr(result_grid, "_experiment_analysis", None), "trials", None) or [])
    for n, r in enumerate(result_grid):
        m = r.metrics or {}
        trial = trials[n] if len(trials) == len(result_grid) else None
        trial_id = trial.trial_id if trial else m.get("trial_id") or (Path(r.path).name if r.path else "")
        status = getattr(trial, "status", "TERMINATED")
        df = r.metrics_dataframe
        def last(key):
            if df is not None and key in df.columns:
                s = df[key].dropna()
                if len(s):
                    return float(s.iloc[-1])
            return m.get(key)
        row = {"trial": trial_id, "status": "FAILED" if r.error or status == "ERROR" else
               "OK" if status == "TERMINATED" else "UNFINISHED"}
        for k in spec.search:
            row[k] = (r.config or {}).get(k)
        try:
            epochs_planned = PretrainConfig.from_dict(spec.trial_dict(dict(r.config or {}))).resolved().epochs
        except Exception:  # noqa: BLE001 - only decides the "stopped early" note
            epochs_planned = None
        row.update({spec.metric: last(spec.metric)})
        for extra in OBJECTIVES + ("loss",):
            if extra not in row:
                row[extra] = last(extra)
        row["epochs_done"] = int(last("epoch")) if last("epoch") is not None else None
        row["time_s"] = m.get("time_total_s")
        row["note"] = ""
        if row["status"] == "OK" and epochs_planned and row["epochs_done"] and row["epochs_done"] < epochs_planned:
            row["note"] = f"stopped early by {(spec.scheduler or {}).get('type', 'the scheduler')}"
        row["error"] = _error_line(r.error)
        rows.append(row)
    return sort_rows(spec, rows)


def sort_rows(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    sign = -1 if spec.mode == "max" else 1
    return sorted(rows, key=lambda r: (r["status"] != "OK", r.get(spec.metric) is None,
                                       sign * (r.get(spec.metric) or 0.0), str(r["trial"])))


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def table_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    cols = list(rows[0]) if rows else ["trial", "status"]
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else row[k]) for k in cols})
    return buf.getvalue()


def table_markdown(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    cols = [c for c in (list(rows[0]) if rows else ["trial", "status"])
            if c in ("trial", "status", spec.metric, "error") or any(r.get(c) not in (None, "") for r in rows)]
    desc = f"{spec.description.strip()}\n\n" if spec.description.strip() else ""
    head = (f"# {spec.study}\n\n{desc}Objective: `{spec.metric}` ({spec.mode}), kNN on a fixed stratified 20% "
            "validation split of the labelled train split (never the test split).\n\n")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)).replace("|", "\\|") for c in cols) + " |")
    return head + "\n".join(lines) + "\n"


def make_plots(spec: SweepSpec, rows: list[dict[str, Any]]) -> dict[str, bytes]:
    """PNG bytes by file name: the augmentation-pair heatmap, accuracy vs batch size (one line per epoch budget),
    accuracy vs temperature, whichever the study's search space has."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "OK" and r.get(spec.metric) is not None]
    out: dict[str, bytes] = {}
    label = spec.metric.replace("_", " ")

    def save(fig, name):
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=120)
        plt.close(fig)
        out[name] = buf.getvalue()

    if "augment" in spec.search and ok:
        comps = list(spec.search["augment"].components) or [
            c for c in COMPONENTS if any(c in parse_components(r["augment"] or "") for r in ok)]
        n = len(comps)
        grid = [[math.nan] * n for _ in range(n)]
        early = set()
        for r in ok:
            parts = parse_components(r["augment"] or "")
            if len(parts) in (1, 2) and all(p in comps for p in parts):
                i, j = comps.index(parts[0]), comps.index(parts[-1])
                grid[i][j] = grid[j][i] = r[spec.metric]
                if r.get("note"):
                    early |= {(i, j), (j, i)}
        fig, ax = plt.subplots(figsize=(1.1 * n + 2, 1.0 * n + 1.5))
        im = ax.imshow(grid, cmap="viridis")
        ax.set_xticks(range(n), comps, rotation=45, ha="right")
        ax.set_yticks(range(n), comps)
        for i in range(n):
            for j in range(n):
                if not math.isnan(grid[i][j]):
                    ax.text(j, i, f"{grid[i][j]:.2f}" + ("*" if (i, j) in early else ""), ha="center",
                            va="center", color="w", fontsize=8)
        ax.set_title(f"{spec.study}: {label}\n(diagonal: one component; off-diagonal: both"
                     + ("; * stopped early by ASHA" if early else "") + ")")
        fig.colorbar(im, ax=ax, label=label)
        save(fig, "augmentation_heatmap.png")

    def line_plot(x_key: str, name: str, logx: bool):
        others = [k for k in spec.search if k != x_key]
        groups: dict[str, list[tuple[float, float]]] = {}
        for r in ok:
            key = ", ".join(f"{k}={r[k]}" for k in others) or (
                f"epochs={spec.base['epochs']}" if "epochs" in spec.base else "")
            groups.setdefault(key, []).append((float(r[x_key]), r[spec.metric]))
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, pts in sorted(groups.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key or None)
        if logx:
            ax.set_xscale("log", base=2 if x_key == "batch_size" else 10)
            xs = sorted({p[0] for pts in groups.values() for p in pts})
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.minorticks_off()
        ax.set_xlabel(x_key.replace("_", " "))
        ax.set_ylabel(label)
        ax.set_title(f"{spec.study}: {label} vs {x_key.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        if any(groups):
            ax.legend(fontsize=8)
        save(fig, name)

    if "batch_size" in spec.search and ok:
        line_plot("batch_size", "accuracy_vs_batch_size.png", logx=True)
    if "temperature" in spec.search and ok:
        line_plot("temperature", "accuracy_vs_temperature.png", logx=True)
    return out


def write_results(spec: SweepSpec, rows: list[dict[str, Any]]) -> dict[str, str]:
    """results.csv, results.md and plots/*.png under the experiment (local or URI); returns name -> location."""
    exp = spec.experiment_uri
    written = {"csv": storage.join(exp, "results.csv"), "markdown": storage.join(exp, "results.md")}
    storage.write_bytes(written["csv"], table_csv(rows).encode())
    storage.write_bytes(written["markdown"], table_markdown(spec, rows).encode())
    for name, png in make_plots(spec, rows).items():
        written[name] = storage.join(exp, "plots", name)
        storage.write_bytes(written[name], png)
    return written


# ----------------------------------------------------------------------------------------------- the driver
def describe(spec: SweepSpec, cfgs: list[PretrainConfig], concurrency: int, notes: list[str],
             cluster: dict[str, float] | None) -> str:
    points = spec.trial_configs()
    sch = spec.scheduler
    lines = [f"sweep {spec.study!r} ({spec.source}): {len(points)} trial(s); objective {spec.metric} ({spec.mode}) "
             f"on the validation split; scheduler "
             + (f"ASHA(time_attr={sch['time_attr']}, max_t={sch['max_t'] or max(c.epochs for c in cfgs)}, "
                f"grace_period={sch['grace_period']}, reduction_factor={sch['reduction_factor']})" if sch else "none"),
             f"  storage: {spec.experiment_uri} (Train runs under {spec.train_storage}/<trial_id>)",
             f"  at once: {concurrency} trial(s) ({'; '.join(notes)})"]
    cols = list(spec.search) + ["epochs", "batch_size", "resources"]
    cols = list(dict.fromkeys(cols))
    rows = []
    for i, (point, cfg) in enumerate(zip(points, cfgs)):
        need = trial_resources(cfg, (cluster or {}).get("GPU", 0))
        res = f"{cfg.num_workers} worker(s) x {cfg.cpus_per_worker:g} CPU" + (" + 1 GPU" if "GPU" in need else "") \
            + (" (+1 GPU each if the cluster has GPUs)" if cfg.use_gpu is None and cluster is None else "")
        vals = {**{k: getattr(cfg, k) for k in ("epochs", "batch_size")},
                **{k: (v.describe() if isinstance(v, Dimension) else v) for k, v in point.items()}, "resources": res}
        rows.append([str(i + 1)] + [str(vals[c]) for c in cols])
    header = ["#"] + cols
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(header)]
    lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _cluster_resources(address: str | None, connect: bool) -> dict[str, float] | None:
    import ray
    if not ray.is_initialized():
        if not connect:
            return None
        from simclr_dist.run.launch import connect_ray
        connect_ray(address)
    return dict(ray.cluster_resources())


def run_sweep(spec: SweepSpec, *, resume: bool = False, retry_failed: bool = False, dry_run: bool = False,
              max_concurrent: int | None = None, ray_address: str | None = None,
              callbacks: list | None = None, log=print) -> dict[str, Any]:
    """Validate, then run (or resume) the sweep; returns {"rows", "files", "experiment"}.

    Everything that can fail on bad input fails here, before any trial starts."""
    cfgs = check_spec(spec)
    address = ray_address or os.environ.get("RAY_ADDRESS")
    cluster = _cluster_resources(address, connect=not dry_run or bool(address))
    concurrency, notes = plan_concurrency(spec, cfgs, cluster, max_concurrent)
    log(describe(spec, cfgs, concurrency, notes, cluster))
    if dry_run:
        return {"rows": [], "files": {}, "experiment": spec.experiment_uri, "concurrency": concurrency}

    from ray import tune

    storage.check_writable(spec.storage_path)
    exp = spec.experiment_uri
    exists = tune.Tuner.can_restore(exp)
    spec_uri = storage.join(exp, EXPERIMENT_SPEC)
    if exists and not resume:
        raise SweepError(f"sweep {exp} already exists: pass --resume to continue it, or choose another study name "
                         "(--set study=NAME) or --storage-path")
    if exists and storage.exists(spec_uri):
        saved = storage.read_json(spec_uri)
        if saved != spec.identity():
            diff = sorted(k for k in saved if saved.get(k) != spec.identity().get(k))
            raise SweepError(f"sweep {exp} was started with a different {', '.join(diff)}: resume with the same file "
                             "and --set overrides, or choose another study name")
    base = {**spec.base, **spec.resources, "knn_split": "val", "storage_path": spec.train_storage}
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base),
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
            scheduler = ASHAScheduler(
                time_attr=sch["time_attr"], max_t=sch["max_t"] or max(c.epochs for c in cfgs),
                grace_period=sch["grace_period"], reduction_factor=sch["reduction_factor"])
        tuner = tune.Tuner(
            trainable, param_space=spec.param_space(),
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                                        num_samples=spec.num_samples, max_concurrent_trials=concurrency,
                                        trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(name=spec.study, storage_path=spec.storage_path,
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      callbacks=callbacks, verbose=1))
    result_grid = tuner.fit()
    rows = collect_rows(spec, result_grid)
    files = write_results(spec, rows)
    return {"rows": rows, "files": files, "experiment": exp, "concurrency": concurrency}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m simclr_dist.sweep",
                                description="SimCLR ablations on Ray Tune: each trial is a Ray Train run.")
    p.add_argument("sweep_file", help="a sweep definition, e.g. tune/temperature.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the file: a pretraining field (epochs=5; a list makes a grid: "
                        "temperature=[0.1,0.5]), a resource (num_workers=2), concurrency, num_samples, "
                        "scheduler=none, scheduler.grace_period=2, "
                        "objective.metric=val_knn_top5, study=NAME")
    p.add_argument("--storage-path", help="shared storage for the sweep (local/NFS path, s3://, gs://); "
                                          "default: the file's storage_path, else ./runs/sweeps")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep: finished trials are kept, "
                                                         "unfinished ones resume from their last checkpoint")
    p.add_argument("--retry-failed", action="store_true", help="with --resume: also rerun trials that failed")
    p.add_argument("--dry-run", action="store_true", help="validate, print the trials and their resources, run nothing")
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at once (also capped by the cluster)")
    p.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from simclr_dist.run.launch import RunError

    args = parse_args(argv)
    try:
        if args.max_concurrent is not None and args.max_concurrent < 1:
            raise SweepError(f"--max-concurrent: must be >= 1, got {args.max_concurrent}")
        overrides = list(args.overrides) + ([f"storage_path={args.storage_path}"] if args.storage_path else [])
        spec = load_spec(args.sweep_file, overrides)
        out = run_sweep(spec, resume=args.resume, retry_failed=args.retry_failed, dry_run=args.dry_run,
                        max_concurrent=args.max_concurrent, ray_address=args.ray_address)
    except (ConfigError, DatasetError, storage.StorageError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, RunError) else 2
    if args.dry_run:
        return 0
    rows = out["rows"]
    print("\n" + table_markdown(spec, rows))
    print("results:")
    for name, where in out["files"].items():
        print(f"  {name}: {where}")
    failed = [r for r in rows if r["status"] != "OK"]
    if failed:
        print(f"{len(failed)} of {len(rows)} trial(s) failed (see the error column)")
    return 1 if rows and len(failed) == len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
