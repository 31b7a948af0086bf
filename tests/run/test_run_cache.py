"""--runs-cache's folder (simclr_dist.run.studies.run_cache): finished runs out and back, nothing overwritten.

The round trip through a real study (a fresh --out that trains nothing) is in test_experiments'
test_experiments_cli_writes_report_plots_results_on_shared_subsets."""

from __future__ import annotations

import gzip
import json

import pytest

from simclr_dist.run.studies.run_cache import finished, pack, unpack
from simclr_dist.storage import StorageError


def write(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_only_finished_runs_are_packed_and_nothing_is_overwritten(tmp_path):
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    write(runs / "a" / "results.json", {"score": 0.5, "config": {"lr": 0.1}})
    write(runs / "b" / "supervised_config.json", {"lr": 0.2})  # started, not finished: no results file
    assert finished(str(runs)) == ["a"]
    assert pack(str(runs), str(cache)) == 1 and pack(str(runs), str(cache)) == 0
    assert json.loads(gzip.decompress((cache / "a.json.gz").read_bytes())) == {"score": 0.5, "config": {"lr": 0.1}}

    elsewhere = tmp_path / "other" / "runs"
    write(elsewhere / "a" / "results.json", {"score": 0.9})  # a run the store has already: kept as it is
    assert unpack(str(cache), str(elsewhere)) == 0
    assert json.loads((elsewhere / "a" / "results.json").read_text()) == {"score": 0.9}
    assert unpack(str(cache), str(tmp_path / "fresh")) == 1
    assert json.loads((tmp_path / "fresh" / "a" / "results.json").read_text())["score"] == 0.5
    assert unpack(str(tmp_path / "no-such-cache"), str(tmp_path / "fresh")) == 0


def test_a_damaged_cache_entry_is_refused_naming_it(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "x.json.gz").write_bytes(b"not gzip")
    with pytest.raises(StorageError, match="x.json.gz: not a gzipped results file"):
        unpack(str(tmp_path / "cache"), str(tmp_path / "runs"))
