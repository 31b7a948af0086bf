"""pyproject.toml: every command is a console script whose target exists, and the runtime dependencies the cluster
path needs are declared (not only installed by hand on some machine)."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
COMMANDS = {"simclr-pretrain": "simclr_dist.pretrain", "simclr-evaluate": "simclr_dist.evaluate",
            "simclr-supervised": "simclr_dist.supervised", "simclr-experiments": "simclr_dist.experiments",
            "simclr-sweep": "simclr_dist.sweep", "simclr-convert": "simclr_dist.data.convert",
            "simclr-export": "simclr_dist.export"}


def test_every_command_is_a_console_script_with_a_main():
    scripts = PROJECT["scripts"]
    assert set(scripts) == set(COMMANDS)
    for name, target in scripts.items():
        module, func = target.split(":")
        assert module == COMMANDS[name], (name, target)
        assert callable(getattr(importlib.import_module(module), func)), target


def test_runtime_dependencies_of_the_cluster_path():
    names = {d.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip() for d in PROJECT["dependencies"]}
    assert {"ray", "torch", "pyarrow", "nvidia-ml-py"} <= names
