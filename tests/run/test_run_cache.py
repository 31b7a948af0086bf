"""--runs-cache's folder (simclr_dist.run.studies.run_cache): finished runs out and back, nothing overwritten.

The round trip through a real study (a fresh --out that trains nothing) is in test_experiments'
test_experiments_cli_writes_report_plots_results_on_shared_subsets."""

from __future__ import annotations

import gzip
import json

import pytest

from simclr_dist.config.supervised import SupervisedConfig
from simclr_dist.report.experiments_md import compute_lines
from simclr_dist.run.jobs.classify_job import RUN_CONFIG_FILE
from simclr_dist.run.studies.run_cache import INVOCATIONS, finished, pack, record_invocation, unpack
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


def test_a_cache_entry_with_a_valid_header_but_a_damaged_body_is_refused_naming_it(tmp_path):
    """gzip's header checks out, the deflate stream does not: zlib.error, which must become the same one line."""
    (tmp_path / "cache").mkdir()
    body = bytearray(gzip.compress(json.dumps({"score": 0.5, "history": list(range(200))}).encode(), mtime=0))
    body[20:40] = bytes(b ^ 0xFF for b in body[20:40])
    (tmp_path / "cache" / "x.json.gz").write_bytes(bytes(body))
    with pytest.raises(StorageError, match=r"x.json.gz: not a gzipped results file \(.*\)$") as e:
        unpack(str(tmp_path / "cache"), str(tmp_path / "runs"))
    assert "\n" not in str(e.value)


def cached(cache) -> dict:
    return json.loads(gzip.decompress((cache / "a.json.gz").read_bytes()))


def test_a_cached_run_of_a_stale_experiment_key_is_replaced_by_the_retrained_run_only_once_finished(tmp_path):
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    old, new = SupervisedConfig(lr=0.1).to_dict(), SupervisedConfig(lr=0.4).to_dict()
    write(runs / "a" / "results.json", {"score": 0.5, "config": old})
    write(runs / "a" / RUN_CONFIG_FILE, old)
    assert pack(str(runs), str(cache)) == 1 and cached(cache)["score"] == 0.5

    # the run retrains under a new key with the same name: its config file says so before its results do
    write(runs / "a" / RUN_CONFIG_FILE, new)
    assert pack(str(runs), str(cache)) == 0 and cached(cache)["score"] == 0.5  # an unfinished run replaces nothing
    write(runs / "a" / "results.json", {"score": 0.7, "config": new})  # finished: the new result reaches the cache
    assert pack(str(runs), str(cache)) == 1 and cached(cache) == {"score": 0.7, "config": new}
    assert pack(str(runs), str(cache)) == 0  # same key: kept

    other = SupervisedConfig(lr=0.4, threads=3).to_dict()  # a cluster field, not the experiment: the entry stays
    write(runs / "a" / "results.json", {"score": 0.9, "config": other})
    write(runs / "a" / RUN_CONFIG_FILE, other)
    assert pack(str(runs), str(cache)) == 0 and cached(cache)["score"] == 0.7


def test_the_invocation_log_keeps_one_line_per_invocation_and_refuses_a_damaged_log(tmp_path):
    cache = str(tmp_path / "cache")
    record_invocation(cache, "2026-12-04T19:00:00+00:00", 60.0, 3, False)
    record_invocation(cache, "2026-12-04T19:00:00+00:00", 120.04, 5, False)  # the same invocation, later: rewritten
    log = record_invocation(cache, "2026-12-03T10:00:00+00:00", 30.0, 2, False)  # an earlier start sorts first
    # two invocations started in the same second are two lines when each names itself
    record_invocation(cache, "2026-12-05T08:00:00+00:00", 5.0, 1, False, invocation="a")
    both = record_invocation(cache, "2026-12-05T08:00:00+00:00", 6.0, 1, True, invocation="b")
    assert [(x["elapsed_s"], x.get("invocation")) for x in both[2:]] == [(5.0, "a"), (6.0, "b")]
    (tmp_path / "cache" / INVOCATIONS).write_text(json.dumps(log))
    assert [(x["started_at"][:10], x["elapsed_s"], x["records"]) for x in log] == [
        ("2026-12-03", 30.0, 2), ("2026-12-04", 120.0, 5)]
    assert json.loads((tmp_path / "cache" / INVOCATIONS).read_text()) == log
    rows = [{"arm": "pixels", "fraction": 0.1, "n": 1, "total_time_s": 1.0, "final_time_s": 1.0, "tuning_time_s": 0.0,
             "images_processed": 0, "tuning_images": 0}]
    text = "\n".join(compute_lines({"rows": rows, "pretraining": {}, "elapsed_s": 120.0, "invocations": log}))
    assert "Wall time of the study: 2.5 min over 2 invocation(s)" in text and "lower bound" not in text
    old = [{**log[0], "reconstructed": "git abc: results.json's elapsed_s"}, log[1]]  # an earlier session's, rebuilt
    text = "\n".join(compute_lines({"rows": rows, "pretraining": {}, "elapsed_s": 120.0, "invocations": old}))
    assert "; 1 of them reconstructed afterwards (each line says from what)" in text and "a lower bound." in text
    assert unpack(cache, str(tmp_path / "runs")) == 0  # not a run: never copied into a run store
    (tmp_path / "cache" / INVOCATIONS).write_text('{"not": "a list"}')
    with pytest.raises(StorageError, match=f"{INVOCATIONS}: not an invocation log"):
        record_invocation(cache, "2026-12-04T20:00:00+00:00", 1.0, 0, False)
    assert json.loads((tmp_path / "cache" / INVOCATIONS).read_text()) == {"not": "a list"}  # kept as it was
