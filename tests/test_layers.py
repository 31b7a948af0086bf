"""The package map, enforced: imports point down the layers, never in a circle, and never at a ``_private`` name.

Layers (a module may import its own layer and the ones below; rooms of one layer never import each other;
commands import anything but other commands):
    0 ground    simclr_dist (package), console, storage     imports nothing of the package
    1 core      simclr_dist.core.*            torch only
    2 data      simclr_dist.data.*            datasets, splits, augmentation, loaders (data.convert: the command's
                                              flags and upload; it imports data and storage only)
    3 config    simclr_dist.config*           every job's dataclass, one validator, one error type
    4 report    simclr_dist.report.*          tables, plots and statistics of finished runs; never run/
    5 store     simclr_dist.run (package), run.store.*   checkpoints, weights, importers, chaos
    6 train     simclr_dist.run.train.*       steps, the two per-worker loops, resume, metrics
    7 jobs      simclr_dist.run.jobs.*        launch, capacity, failure, the pretraining and classifier jobs
    8 eval | studies  simclr_dist.run.eval.*, simclr_dist.run.studies.*   two rooms side by side
    9 commands  pretrain, evaluate, supervised, experiments, sweep, export, results: nothing imports them
Every import counts, also one inside a function (a lazy import is still an arrow).
"""

from __future__ import annotations

import ast
import functools
import gc
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "simclr_dist"
COMMANDS = {f"simclr_dist.{c}" for c in ("pretrain", "evaluate", "supervised", "experiments", "sweep", "export", "results")}
LAYER_NAMES = ("ground", "core", "data", "config", "report", "store", "train", "jobs", "eval|studies", "commands")
# (prefix, layer, room): the longest matching prefix wins; two rooms of one layer may not import each other
ROOMS = (("simclr_dist.core", 1, "core"), ("simclr_dist.data", 2, "data"), ("simclr_dist.config", 3, "config"),
         ("simclr_dist.report", 4, "report"), ("simclr_dist.run", 5, "store"), ("simclr_dist.run.store", 5, "store"),
         ("simclr_dist.run.train", 6, "train"), ("simclr_dist.run.jobs", 7, "jobs"),
         ("simclr_dist.run.eval", 8, "eval"), ("simclr_dist.run.studies", 8, "studies"))
GROUND = ("simclr_dist", "simclr_dist.console", "simclr_dist.storage")


def parse(path: Path) -> ast.Module:
    """``ast.parse`` with the garbage collector held off: a finalizer that raises while the AST is being built (numba
    freeing compiled FFCV kernels, after the FFCV tests in the same process) would surface as a SystemError here.
    Cached on (path, modification time, size): the checks below read the same ~150 files several times."""
    stat = path.stat()
    return parse_text(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=None)
def parse_text(path: str, mtime_ns: int, size: int) -> ast.Module:
    gc.disable()  # no collection while the AST is built (a collect() per file cost ~0.5 s each after heavy tests)
    try:
        return ast.parse(Path(path).read_text(), path)
    finally:
        gc.enable()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> tuple[int, str]:
    """(layer, room) of a package module."""
    if module in COMMANDS:
        return 9, "commands"
    if module in GROUND:
        return 0, "ground"
    best = None
    for prefix, level, name in ROOMS:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, level, name)
    if best is None:
        raise AssertionError(f"{module}: not on the map in tests/test_layers.py; put it in a layer's folder")
    return best[1], best[2]


def layer(module: str) -> int:
    return room(module)[0]


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(importer: str, node: ast.ImportFrom, known: set[str]) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not (PACKAGE / Path(*base[1:]) / "__init__.py").exists() or importer.count(".") == 0:
        base = base[:-1]  # a module's relative import starts at its package
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import of a package module in ``path``."""
    out = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "simclr_dist"]
        elif isinstance(node, ast.ImportFrom):
            mod = resolve(name, node, known)
            if mod.split(".")[0] != "simclr_dist":
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub, None, node.lineno) if sub in known else (mod, a.name, node.lineno))
    return out


def graph() -> dict[str, list[tuple[str, str | None, int]]]:
    mods = modules()
    known = set(mods)
    return {name: [(m, n, line) for m, n, line in imports(name, path, known) if m in known]
            for name, path in mods.items()}


def upward_arrows() -> list[str]:
    bad: list[str] = []
    for src, deps in graph().items():
        for dst, _, line in deps:
            if dst == src or dst in ("simclr_dist",):
                continue
            (ls, rs), (ld, rd) = room(src), room(dst)
            if ld > ls or (ls == ld == 9):
                bad.append(f"{src} imports {dst} ({LAYER_NAMES[ls]} -> {LAYER_NAMES[ld]})")
            elif ls == ld and rs != rd:
                bad.append(f"{src} imports {dst} (sideways: {rs} -> {rd})")
    return sorted(set(bad))


def cycles() -> list[str]:
    edges = {src: sorted({d for d, _, _ in deps if d != src and d != "simclr_dist"}) for src, deps in graph().items()}
    found, state, stack = [], {}, []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in edges.get(n, []):
            if state.get(m) == 1:
                found.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)
    return found


def private_imports(extra: tuple[Path, ...] = ()) -> list[str]:
    """``from simclr_dist.x import _name`` and ``x._name`` on an imported package module, from another module."""
    known = set(modules())
    bad = []
    for path in [*sorted(PACKAGE.rglob("*.py")), *(p.resolve() for p in extra)]:
        name = module_name(path) if path.is_relative_to(PACKAGE) else path.stem
        tree = parse(path)
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = resolve(name, node, known) if path.is_relative_to(PACKAGE) else (node.module or "")
                if mod.split(".")[0] != "simclr_dist":
                    continue
                for a in node.names:
                    if f"{mod}.{a.name}" in known:
                        aliases[a.asname or a.name] = f"{mod}.{a.name}"
                    elif a.name.startswith("_") and mod != name:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {mod}.{a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in known and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return bad


def test_every_module_is_on_the_map():
    for name in modules():
        layer(name)


# Arrows still being taken down while the package moves into its layers (none left); an entry must still occur
# (a stale one fails test_known_debt_is_current), and the set only ever shrinks.
KNOWN_DEBT: set[str] = set()


def test_no_import_points_up_the_layers():
    assert [a for a in upward_arrows() if a not in KNOWN_DEBT] == []


def test_no_import_cycle():
    assert [c for c in cycles() if c not in KNOWN_DEBT] == []


def test_known_debt_is_current():
    assert KNOWN_DEBT <= set(upward_arrows()) | set(cycles())


def test_no_private_name_crosses_a_module():
    extra = tuple(sorted((ROOT / "bench").glob("*.py"))) + tuple(sorted((ROOT / "tests").rglob("*.py")))
    assert private_imports(extra=extra) == []


def test_core_is_torch_only():
    """core/ imports no third-party package but torch (and torchvision's ResNet blocks) and the standard library."""
    allowed = {"torch", "torchvision", "numpy", "__future__", "simclr_dist"}
    for path in sorted((PACKAGE / "core").rglob("*.py")):
        for node in ast.walk(parse(path)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for n in names:
                top = n.split(".")[0]
                assert top in allowed or top in sys.stdlib_module_names, f"{path.name} imports {n}"


# violation -> (importer, its source, imported, its source): each must be caught
PLANTED = {
    "up": ("core/a.py", "from simclr_dist.run import b\n", "run/b.py", "x = 1\n"),
    "cycle": ("core/a.py", "from simclr_dist.core import b\n", "core/b.py", "from simclr_dist.core import a\n"),
    "private": ("core/a.py", "from simclr_dist.core.b import _hidden\n", "core/b.py", "_hidden = 1\n"),
    "report-to-run": ("report/a.py", "from simclr_dist.run.store import b\n", "run/store/b.py", "x = 1\n"),
    "sideways": ("run/eval/a.py", "from simclr_dist.run.studies import b\n", "run/studies/b.py", "x = 1\n"),
    "train-to-jobs": ("run/train/a.py", "from simclr_dist.run.jobs.b import x\n", "run/jobs/b.py", "x = 1\n"),
}


@pytest.mark.parametrize("violation", sorted(PLANTED))
def test_the_guard_catches_what_it_guards(tmp_path, monkeypatch, violation):
    """The checks above fail on a planted violation (so a green run means something)."""
    pkg = tmp_path / "simclr_dist"
    src, body, dst, dst_body = PLANTED[violation]
    for rel in (src, dst):
        d = pkg
        for part in Path(rel).parts[:-1]:
            (d / "__init__.py").parent.mkdir(parents=True, exist_ok=True)
            (d / "__init__.py").touch()
            d = d / part
        d.mkdir(parents=True, exist_ok=True)
        (d / "__init__.py").touch()
    (pkg / src).write_text(body)
    (pkg / dst).write_text(dst_body)
    me = sys.modules[__name__]
    monkeypatch.setattr(me, "ROOT", tmp_path)
    monkeypatch.setattr(me, "PACKAGE", pkg)
    found = {"cycle": cycles, "private": private_imports}.get(violation, upward_arrows)()
    assert found, violation
