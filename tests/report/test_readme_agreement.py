"""The README's results block is what the committed study's results.json gives, character for character."""

from __future__ import annotations

from pathlib import Path

import simclr_dist.results as results_cmd
from simclr_dist.report.readme_table import BEGIN, END

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "docs" / "results" / "fashion-mnist-cpu" / "results.json"


def test_the_readme_results_block_is_generated_from_the_committed_results(capsys):
    assert STUDY.is_file(), f"{STUDY} is not committed"
    readme = (ROOT / "README.md").read_text()
    assert readme.count(BEGIN) == readme.count(END) == 1
    block = readme.split(BEGIN)[1].split(END)[0]
    assert "| SimCLR + linear probe |" in block and "(n=" in block  # a table, not an empty block
    assert results_cmd.main([str(STUDY), "--readme", str(ROOT / "README.md"), "--check"]) == 0, capsys.readouterr().err


def test_the_check_fails_on_a_readme_that_disagrees(tmp_path, capsys):
    readme = (ROOT / "README.md").read_text()
    head, rest = readme.split(BEGIN)
    body, tail = rest.split(END)
    edited = tmp_path / "README.md"
    edited.write_text(head + BEGIN + body.replace("0.", "1.", 1) + END + tail)
    assert results_cmd.main([str(STUDY), "--readme", str(edited), "--check"]) == 1
    assert "differs from" in capsys.readouterr().err
