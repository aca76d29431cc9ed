"""``python -m benchmarks.dft_2d_batch``: its arguments, shape selection and one tiny run."""

from __future__ import annotations

import json

import pytest

from benchmarks import dft_2d_batch as bench
from epilsr.correlate import choose_route, plan_for


def test_bad_batches_are_one_line_errors(capsys):
    for bad in (["--batches", "16"], ["--batches", "16,x"], ["--batches", "0,16"]):
        with pytest.raises(SystemExit):
            bench.main(bad)
    assert "--batches: expected" in capsys.readouterr().err


def test_shapes_are_those_auto_sends_to_dft_2d():
    plan = plan_for()
    picked = bench.shapes(plan, quick=False)
    assert bench.PREDICT in picked and picked
    for n, b, k in picked:
        assert choose_route((1, n, n, bench.F), (b, k, k, bench.F), plan) == "dft_2d"


def test_quick_run_writes_times_and_geomean(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "QUICK", [(32, 8, 21)])  # one tiny shape
    monkeypatch.setattr(bench, "shapes", lambda plan, quick: list(bench.QUICK))
    out = tmp_path / "r.json"
    result = bench.main(["--quick", "--rounds", "1", "--batches", "4,8", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["batches"] == [4, 8] and set(saved["rows"][0]["median_s"]) == {"4", "8"}
    assert result["geomean"]["8"] > 0 and "geometric mean" in capsys.readouterr().out
