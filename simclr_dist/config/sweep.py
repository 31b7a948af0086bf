"""A sweep file, parsed and validated: what a study searches, what it selects on, and what every trial shares.

A sweep file is data: the pretraining fields every trial shares (``base``), the ``search`` space over pretraining
fields, the ``objective`` (a held-out accuracy the trainable reports, never the test split), the ``scheduler``
(ASHA or none), the ``resources`` of one trial and the ``concurrency``. Why its own module: every mistake a file can
hold (an unknown field or section, a value of the wrong type, an unknown augmentation) is one line naming it, found
before Ray starts; the checks that need the trials' resolved configs live in :mod:`simclr_dist.run.studies.sweep_run`.

Augmentation studies (paper Figure 5) use ``augment: {pairs: [c1, c2, ...], with: crop}``: every single component
and every unordered pair, each policy also holding the ``with`` components (the crop and resize every view gets).
With ``augment2: crop`` in ``base`` the other branch gets only the crop: the paper's one-branch setting.

Replicates: ``seeds: 3`` (seeds 0, 1, 2) or ``seeds: [0, 7]`` runs every cell of the search space once per seed, each
a separate trial with its own pretraining seed (init, data order, augmentation draws); the report aggregates a cell
over its seeds. The seed is not a search dimension (a ``search.seed`` is refused), so a cell is always the search
values alone; ``seeds`` is refused with ``num_samples > 1`` (two trials of a cell at one seed) and with random
(choice, uniform, loguniform) dimensions (every trial draws its own cell).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from simclr_dist.config.base import ConfigError, base_type, is_uri
from simclr_dist.config.pretrain import PretrainConfig
from simclr_dist.data.augment import parse_components

SECTIONS = ("study", "description", "base", "search", "objective", "scheduler", "resources", "concurrency",
            "num_samples", "seeds", "storage_path")
RESOURCE_FIELDS = ("num_workers", "cpus_per_worker", "use_gpu")
# Set by the sweep for every trial (each trial is its own Train run; the monitor always uses the validation split).
CONTROLLED_FIELDS = {"storage_path": "--storage-path", "name": "the trial id", "ray_address": "--ray-address",
                     "summary_json": "the results table", "knn_split": "the sweep (always 'val')",
                     "verbose": "the sweep", "ray": "the sweep (a trial is a Ray Train run)"}
# held-out accuracies the trainable reports on the validation split: kNN, the linear probe (--linear-probe) and the
# online probe (--online-probe: every epoch, whatever knn_every says)
OBJECTIVES = ("val_linear_top1", "val_linear_top5", "val_knn_top1", "val_knn_top5", "online_probe_top1")
ONLINE_OBJECTIVES = ("online_probe_top1",)
SCHEDULERS = ("none", "asha")
ASHA_KEYS = ("type", "time_attr", "max_t", "grace_period", "reduction_factor")
DIMENSION_KINDS = ("grid", "choice", "uniform", "loguniform", "pairs")
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
    with_: tuple[str, ...] = ()       # pairs: components every policy also holds (e.g. the crop every view gets)

    def policy(self, first: str, second: str) -> str:
        """The ``augment`` value of the heatmap cell (first, second) of a pairs dimension (canonical order)."""
        return ",".join(parse_components([*self.with_, first, second]))

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
    seeds: list[int] | None = None  # replicates of every cell (None: one trial a cell, at base's seed)
    storage_path: str = "./runs/sweeps"

    # -- derived
    @property
    def experiment_uri(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.study}"

    @property
    def train_storage(self) -> str:
        return f"{self.experiment_uri}/{TRAIN_DIR}"

    def identity(self) -> dict[str, Any]:
        """What a resume must keep (concurrency and storage may change)."""
        return json.loads(json.dumps({
            "base": self.base, "search": {k: dataclasses.asdict(d) for k, d in self.search.items()},
            "metric": self.metric, "mode": self.mode, "scheduler": self.scheduler, "resources": self.resources,
            "num_samples": self.num_samples, "seeds": self.seeds}, default=list))

    def trial_configs(self) -> list[dict[str, Any]]:
        """The search-space points of every trial (grid product x seeds x num_samples); random dimensions stay
        symbolic. With ``seeds`` every point holds its ``seed``."""
        grid_keys = [k for k, d in self.search.items() if d.is_grid]
        points = []
        for _ in range(self.num_samples):
            for combo in itertools.product(*(self.search[k].values for k in grid_keys)):
                for seed in self.seeds or [None]:
                    point = dict(zip(grid_keys, combo))
                    point.update({k: d for k, d in self.search.items() if not d.is_grid})
                    if seed is not None:
                        point["seed"] = seed
                    points.append(point)
        return points

    def param_space(self) -> dict[str, Any]:
        from ray import tune
        space = {}
        for k, d in self.search.items():
            space[k] = {"grid": lambda v: tune.grid_search(v), "choice": lambda v: tune.choice(v),
                        "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}[d.kind](
                list(d.values))
        if self.seeds:  # the replicates: one more grid axis, so every cell runs once per seed
            space["seed"] = tune.grid_search(list(self.seeds))
        return space

    def trial_base(self) -> dict[str, Any]:
        """The PretrainConfig fields every trial shares, with those the sweep controls: the validation split, the
        linear probe or the online probe when the objective is its accuracy, and the trials' shared storage."""
        probe = self.metric.startswith("val_linear") or bool(self.base.get("linear_probe"))
        online = self.metric in ONLINE_OBJECTIVES or bool(self.base.get("online_probe"))
        return {**self.base, **self.resources, "knn_split": "val", "linear_probe": probe, "online_probe": online,
                "storage_path": self.train_storage}

    def trial_dict(self, point: dict[str, Any]) -> dict[str, Any]:
        """The PretrainConfig fields of one trial (before the trial id names its run)."""
        return {**self.trial_base(), **point, "name": "trial"}


def fail(where: str, msg: str) -> typing.NoReturn:
    """Raise the one-line :class:`SweepError` of ``where`` (a file and section, or a ``--set`` item)."""
    raise SweepError(f"{where}: {msg}")


_HINTS = typing.get_type_hints(PretrainConfig)
_FIELDS = {f.name for f in dataclasses.fields(PretrainConfig)}


def suggest(name: str, options: typing.Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest option, or nothing."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_field(where: str, key: str, *, allow_resources: bool = False) -> None:
    if key not in _FIELDS:
        fail(where, f"unknown parameter {key!r}: not a pretraining field{suggest(key, _FIELDS)} "
                     "(python -m simclr_dist.pretrain --help lists them)")
    if key in CONTROLLED_FIELDS:
        fail(where, f"{key!r} is set by {CONTROLLED_FIELDS[key]}, not by the sweep file")
    if key in RESOURCE_FIELDS and not allow_resources:
        fail(where, f"{key!r} is a per-trial resource: set it under 'resources' (it cannot vary across trials)")


def _coerce(where: str, key: str, value: Any) -> Any:
    """A YAML value as the field's type (int for float is fine; bool is never a number), or a one-line error."""
    tp, optional = base_type(_HINTS[key])
    if value is None:
        if optional:
            return None
        fail(where, f"{key} must be a {tp.__name__}, got null")
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
        fail(where, f"{key} must be a {tp.__name__}, got {value!r}")
    return value


def _one_component(where: str, name: Any) -> str:
    try:
        parts = parse_components(str(name))
    except ValueError as e:
        fail(where, str(e))
    if len(parts) != 1:
        fail(where, f"{name!r} is not one augmentation component")
    return parts[0]


def _parse_pairs(where: str, key: str, values: list[Any], with_: Any) -> Dimension:
    """Every single component and every unordered pair, as canonical ``augment`` policies that also hold the
    ``with`` components; cells that resolve to the same policy (e.g. crop with crop) share one trial."""
    if key != "augment":
        fail(where, "'pairs' makes augmentation pairs: use it for 'augment' only")
    comps = [_one_component(where, name) for name in values]
    if len(set(comps)) != len(comps):
        fail(where, f"duplicate components in {values!r}")
    try:
        base = parse_components(with_ if isinstance(with_, (str, list)) else str(with_)) if with_ else ()
    except ValueError as e:
        fail(f"{where}.with", str(e))
    dim = Dimension("grid", [], tuple(comps), tuple(base))
    cells = [(c, c) for c in comps] + list(itertools.combinations(comps, 2))
    dim.values = list(dict.fromkeys(dim.policy(a, b) for a, b in cells))
    return dim


def _parse_dimension(where: str, key: str, raw: Any) -> Dimension:
    if isinstance(raw, list):
        raw = {"grid": raw}
    if isinstance(raw, dict) and "pairs" in raw and set(raw) <= {"pairs", "with"}:
        if not isinstance(raw["pairs"], list) or not raw["pairs"]:
            fail(where, f"pairs needs a non-empty list, got {raw['pairs']!r}")
        return _parse_pairs(where, key, raw["pairs"], raw.get("with"))
    if not isinstance(raw, dict) or len(raw) != 1:
        fail(where, f"a search dimension is a list of values or one of {{{', '.join(DIMENSION_KINDS)}: ...}}, "
                     f"got {raw!r}")
    (kind, values), = raw.items()
    if kind not in DIMENSION_KINDS:
        fail(where, f"unknown kind {kind!r}; choose from {', '.join(DIMENSION_KINDS)}"
                     f"{suggest(kind, DIMENSION_KINDS)}")
    if not isinstance(values, list) or not values:
        fail(where, f"{kind} needs a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            fail(where, f"{kind} needs [low, high] numbers, got {values!r}")
        lo, hi = (float(v) for v in values)
        if not lo < hi or (kind == "loguniform" and lo <= 0):
            fail(where, f"{kind} needs 0 {'<' if kind == 'loguniform' else '<='} low < high, got {values!r}")
        if base_type(_HINTS[key])[0] is not float:
            fail(where, f"{kind} draws floats; {key} is a {base_type(_HINTS[key])[0].__name__}: use a grid")
        return Dimension(kind, [lo, hi])
    vals = [_coerce(where, key, v) for v in values]
    if key == "augment":  # canonical form, so the heatmap and the table name each policy once
        try:
            vals = [",".join(parse_components(v)) if v is not None else None for v in vals]
        except ValueError as e:
            fail(where, str(e))
    if len({json.dumps(v) for v in vals}) != len(vals):
        fail(where, f"duplicate values in {vals!r} (repeat trials with 'seeds: N')")
    return Dimension(kind, vals)


def _parse_seeds(where: str, raw: Any) -> list[int]:
    """``seeds: N`` (seeds 0..N-1) or a list of distinct integer seeds >= 0, or a one-line error."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)
    if is_int(raw):
        if raw < 1:
            fail(where, f"must be a number of seeds >= 1 or a list of distinct seeds, got {raw!r}")
        return list(range(raw))
    if not isinstance(raw, list) or not raw or not all(is_int(v) and v >= 0 for v in raw):
        fail(where, f"must be a number of seeds >= 1 or a list of distinct integer seeds >= 0, got {raw!r}")
    if len(set(raw)) != len(raw):
        fail(where, f"duplicate seeds in {raw!r}")
    return list(raw)


def _parse_scheduler(where: str, raw: Any) -> dict[str, Any] | None:
    if raw is None or raw == "none" or raw == {"type": "none"}:
        return None
    if raw == "asha":
        raw = {"type": "asha"}
    if not isinstance(raw, dict):
        fail(where, f"'none', 'asha' or a mapping with type: asha, got {raw!r}")
    if raw.get("type") not in SCHEDULERS:
        fail(where, f"unknown scheduler type {raw.get('type')!r}; choose from {', '.join(SCHEDULERS)}")
    if raw["type"] == "none":
        if len(raw) > 1:
            fail(where, f"scheduler none takes no parameters, got {sorted(set(raw) - {'type'})}")
        return None
    for k in raw:
        if k not in ASHA_KEYS:
            fail(f"{where}.{k}", f"unknown ASHA parameter{suggest(k, ASHA_KEYS)}; choose from {', '.join(ASHA_KEYS)}")
    out = {"type": "asha", "time_attr": raw.get("time_attr", "epoch"), "max_t": raw.get("max_t"),
           "grace_period": raw.get("grace_period", 1), "reduction_factor": raw.get("reduction_factor", 2)}
    for k in ("max_t", "grace_period"):
        if out[k] is not None and (not isinstance(out[k], int) or isinstance(out[k], bool) or out[k] < 1):
            fail(f"{where}.{k}", f"must be an integer >= 1, got {out[k]!r}")
    rf = out["reduction_factor"]
    if not isinstance(rf, (int, float)) or isinstance(rf, bool) or rf <= 1:
        fail(f"{where}.reduction_factor", f"must be > 1, got {rf!r}")
    if out["max_t"] is not None and out["grace_period"] > out["max_t"]:
        fail(f"{where}.grace_period", f"{out['grace_period']} exceeds max_t {out['max_t']}")
    return out


def parse_sweep(data: Any, source: str = "<sweep>", overrides: typing.Sequence[str] = ()) -> SweepSpec:
    """Parse (and apply ``--set`` overrides to) a sweep mapping; raises :class:`SweepError`."""
    if not isinstance(data, dict):
        fail(source, "a sweep file is a mapping with sections " + ", ".join(SECTIONS))
    data = json.loads(json.dumps(data))  # a deep copy (YAML scalars only)
    for k in data:
        if k not in SECTIONS:
            fail(f"{source}: {k}", f"unknown section{suggest(k, SECTIONS)}; choose from {', '.join(SECTIONS)}")
    for section in ("base", "search", "objective", "resources"):
        data.setdefault(section, {})
        if data[section] is None:
            data[section] = {}
        if not isinstance(data[section], dict):
            fail(f"{source}: {section}", f"must be a mapping, got {data[section]!r}")
    for item in overrides:
        _apply_override(data, item)

    study = data.get("study") or Path(source).stem
    if not isinstance(study, str) or not study or "/" in study or study.startswith("."):
        fail(f"{source}: study", f"must be a plain directory name, got {study!r}")
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
        if k == "seed":  # a seed is a replicate of every cell, not a cell of its own
            fail(f"{source}: search.seed", "repeat every cell over seeds with the top-level 'seeds: N' (or "
                                           "'seeds: [0, 7]'), not a seed dimension")
        spec.search[k] = _parse_dimension(f"{source}: search.{k}", k, v)
        spec.base.pop(k, None)
    for k, v in data["resources"].items():
        if k not in RESOURCE_FIELDS:
            fail(f"{source}: resources.{k}", f"unknown resource{suggest(k, RESOURCE_FIELDS)}; choose from "
                                               f"{', '.join(RESOURCE_FIELDS)}")
        spec.resources[k] = _coerce(f"{source}: resources.{k}", k, v)
    obj = data["objective"]
    for k in obj:
        if k not in ("metric", "mode"):
            fail(f"{source}: objective.{k}", "unknown key; the objective has 'metric' and 'mode'")
    spec.metric, spec.mode = obj.get("metric", spec.metric), obj.get("mode", spec.mode)
    if spec.mode not in ("max", "min"):
        fail(f"{source}: objective.mode", f"must be max or min, got {spec.mode!r}")
    spec.scheduler = _parse_scheduler(f"{source}: scheduler", data.get("scheduler"))
    for k in ("concurrency", "num_samples"):
        v = data.get(k, getattr(spec, k))
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            fail(f"{source}: {k}", f"must be an integer >= 1, got {v!r}")
        setattr(spec, k, v)
    if data.get("seeds") is not None:
        spec.seeds = _parse_seeds(f"{source}: seeds", data["seeds"])
        if "seed" in spec.base:
            fail(f"{source}: base.seed", f"conflicts with seeds {spec.seeds}: every trial's seed comes from 'seeds'")
        # a cell's trials are its seeds: two trials of one cell at one seed (num_samples) or cells drawn at random
        # (one draw per trial, so no two seeds share a cell) would not be a cell over seeds
        if spec.num_samples > 1:
            fail(f"{source}: seeds", f"cannot be combined with num_samples {spec.num_samples}: with seeds every cell "
                                     "runs once per seed; drop num_samples (or seeds)")
        drawn = [k for k, d in spec.search.items() if not d.is_grid]
        if drawn:
            fail(f"{source}: seeds", f"cannot be combined with the random search.{drawn[0]} "
                                     f"({spec.search[drawn[0]].kind}): every seed would draw its own value, so no "
                                     "cell has seeds to aggregate; make it a grid (or drop seeds)")
    sp = data.get("storage_path", spec.storage_path)
    if not isinstance(sp, str) or not sp:
        fail(f"{source}: storage_path", f"must be a path or URI, got {sp!r}")
    spec.storage_path = sp if is_uri(sp) else os.path.abspath(os.path.expanduser(sp))
    if not spec.search:
        fail(f"{source}: search", "is empty: a sweep needs at least one dimension")
    return spec


def _apply_override(data: dict[str, Any], item: str) -> None:
    """``key=value`` (value parsed as YAML): a pretraining field (a list makes it a grid dimension, a scalar fixes
    it), a resource, a top-level setting (concurrency, num_samples, seeds, scheduler, storage_path) or a dotted
    ``objective.metric`` / ``scheduler.grace_period``."""
    where = f"--set {item}"
    if "=" not in item:
        fail(where, "expected key=value")
    key, text = item.split("=", 1)
    key = key.strip().replace("-", "_")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        fail(where, f"value is not valid YAML ({str(e).splitlines()[0]})")
    head, _, sub = key.partition(".")
    if sub:
        if head not in ("objective", "scheduler", "base", "search", "resources"):
            fail(where, f"unknown parameter {key!r}")
        section = data.get(head)
        if head == "scheduler" and not isinstance(section, dict):
            section = {"type": section or "none"} if section not in (None, "none") else {"type": "none"}
        section = dict(section or {})
        section[sub] = value
        if head == "search":
            data.setdefault("base", {}).pop(sub, None)
        data[head] = section
        return
    if key in ("concurrency", "num_samples", "seeds", "scheduler", "storage_path", "study", "description"):
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
        fail(where, f"unknown parameter {key!r}{suggest(key, list(_FIELDS) + list(SECTIONS))}")


def load_spec(path: str, overrides: typing.Sequence[str] = ()) -> SweepSpec:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SweepError(f"{path}: cannot read the sweep file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_sweep(data, path, overrides)


