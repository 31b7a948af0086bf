"""results.json's packed arrays: exact round trip, older plain files read unchanged, damage refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simclr_dist.report.results_file import pack, pack_ints, read_results, unpack, unpack_ints, write_results


def test_pack_round_trips_predictions_and_subsets_exactly(tmp_path):
    rng = np.random.default_rng(0)
    preds = rng.integers(0, 10, 10_000).tolist()
    subset = np.sort(rng.choice(60_000, 6_000, replace=False)).tolist()
    summary = {"records": [{"arm": "finetune", "predictions": preds}, {"arm": "pixels", "predictions": preds[:5]}],
               "subsets": {"0.1/0": subset}, "other": 1}
    path = tmp_path / "results.json"
    write_results(str(path), summary)
    on_disk = json.loads(path.read_text())
    assert on_disk["records"][0]["predictions"]["packed"] == "int32-zlib-base64"
    assert path.stat().st_size < len(json.dumps(summary)) / 3  # packing is what makes committing it reasonable
    back = read_results(str(path))
    assert back == summary and summary["records"][0]["predictions"] is preds  # the input is not modified
    assert unpack(pack(summary)) == summary


def test_plain_files_read_unchanged_and_damage_is_refused(tmp_path):
    plain = {"records": [{"arm": "a", "predictions": [1, 2, 3]}], "subsets": {"1/0": [0, 1]}}
    assert unpack(plain) == plain
    bad = pack_ints([1, 2, 3]) | {"length": 4}
    with pytest.raises(ValueError, match="holds 3 values, its header says 4"):
        unpack_ints(bad)
    with pytest.raises(ValueError, match="unknown packing"):
        unpack_ints({"packed": "lz4", "length": 1, "data": ""})
    (tmp_path / "x.json").write_text('{"rows": []}')
    with pytest.raises(ValueError, match="no 'records' list"):
        read_results(str(tmp_path / "x.json"))
