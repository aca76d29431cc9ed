"""The accelerator benchmark command (``python -m benchmarks.accelerator``): its section
registry, arguments, tables, budget and the plan it reports; the slow test runs its ``--quick``
sections on the CPU."""

from __future__ import annotations

import dataclasses
import json
import time

import jax.numpy as jnp
import pytest

from benchmarks import accelerator as acc
from epilsr.correlate import plan as plan_module
from epilsr.correlate import plan_for


def test_registry_has_sizes_and_weights_for_both_modes():
    assert list(acc.SECTIONS) == ["lsr", "posterior", "train", "predict", "raster"]
    for s in acc.SECTIONS.values():
        assert callable(s.run) and s.title and s.min_s > 0
        assert set(s.sizes) == {"gpu", "quick"} and set(s.weight) == {"gpu", "quick"}
    # the GPU weights are the seconds planned per section: they fill the default budget
    assert sum(s.weight["gpu"] for s in acc.SECTIONS.values()) <= acc.DEFAULT_BUDGET_S["gpu"]
    got = acc.shares(["posterior", "raster"], 100.0, "quick")
    assert got["posterior"] + got["raster"] == pytest.approx(100.0)
    assert got["raster"] / got["posterior"] == pytest.approx(50 / 25)


def test_parse_args_defaults_and_errors(capsys):
    a = acc.parse_args([])
    assert a.sections == list(acc.SECTIONS) and a.budget_s == 450 and a.rounds == 5
    q = acc.parse_args(["--quick", "--sections", "raster,lsr"])
    assert q.sections == ["raster", "lsr"] and q.budget_s == 300 and q.rounds == 1
    for bad in (["--sections", "lsr,gpu"], ["--budget-s", "0"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            acc.parse_args(bad)
    err = capsys.readouterr().err
    assert "--sections: expected some of lsr, posterior" in err and "['gpu']" in err
    assert "--budget-s: expected a positive number" in err


def _record():
    row = dict(section="lsr", case="paper: one call per window", unit="ms/window", ours=12.5,
               torch=40.0, torch_over_ours=3.2, achieved_over_bound=1.5,
               peak={"rss_mib": 900.0, "device_mib": 1234.4}, note="a | b")
    raster = dict(row, section="raster", case="2048^2 paper", unit="Mpx/min", ours=70.0,
                  torch="torch not installed", torch_over_ours=None, achieved_over_bound=None,
                  peak={"rss_mib": 512.0}, note="")
    return {"section": "lsr", "rows": [row, raster]}


def test_summary_and_markdown_tables():
    rows = acc.summary_rows([_record()])
    assert rows[0] == ["lsr", "paper: one call per window", 12.5, 40.0, 3.2, "ms/window", 1.5,
                       "1234 dev", "a | b"]
    assert rows[1][3:5] == ["torch not installed", "-"] and rows[1][7] == "512 rss"
    md = acc.markdown_table(acc.HEADER, rows).splitlines()
    assert md[0] == "| " + " | ".join(acc.HEADER) + " |" and md[1] == "|---" * 9 + "|"
    assert md[2] == ("| lsr | paper: one call per window | 12.5 | 40 | 3.2 | ms/window | 1.5 | "
                     "1234 dev | a \\| b |")
    text = acc.bl.table(acc.HEADER, rows)
    assert "torch not installed" in text and len(text.splitlines()) == 4


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_results_section_labels_cpu_smoke_runs(backend):
    meta = dict(device="NVIDIA H200" if backend == "gpu" else "cpu", backend=backend,
                date="2026-12-03T11:00:00+00:00", commit="abc", working_tree_modified=False,
                processor="x", cpu_affinity=16, jax="0.11", load_average=0.5)
    text = acc.results_section(dict(
        meta=meta, command="python -m benchmarks.accelerator --append-results", budget_s=450.0,
        total_s=400.0, torch_version="2.11", plan_line="CorrelationPlan: ...",
        plan_check="plan check: OK", sections=[_record()],
        skipped=[{"section": "raster", "case": "4096^2", "reason": "budget: 3 s left"}]))
    title = text.splitlines()[0]
    assert title.startswith("## benchmarks.accelerator") and "2026-12-03" in title
    assert ("CPU smoke run" in title) == (backend == "cpu")
    assert "Commit abc" in text and "--append-results" in text
    assert "- raster: 4096^2: budget: 3 s left" in text
    assert "| lsr | paper: one call per window |" in text


def test_gpu_plan_has_no_cpu_chunking(monkeypatch):
    # plan_for on arrays picks by their platform: fake a GPU platform
    monkeypatch.setattr(plan_module, "array_platform", lambda *arrays: "gpu")
    plan = plan_for(jnp.zeros(1))
    assert plan.platform == "gpu" and acc.cpu_chunking(plan) == []
    line = acc.plan_line(plan)
    assert "platform=gpu" in line and line.endswith("CPU-only chunking: off")
    assert acc.check_plan(plan) == "plan check: OK (gpu: no CPU-only chunking)"
    cpu = plan_for(platform="cpu")
    assert acc.plan_line(cpu).endswith(f"on (column_group_bytes={cpu.column_group_bytes}, "
                                       f"dft_2d_batch={cpu.dft_2d_batch})")
    with pytest.raises(ValueError, match="plan check FAILED: the gpu plan applies"):
        acc.check_plan(dataclasses.replace(cpu, platform="gpu"))


def test_budget_too_small_skips_every_section_with_a_reason(tmp_path, capsys):
    out = tmp_path / "a.json"
    md = tmp_path / "RESULTS.md"
    payload = acc.main(["--quick", "--budget-s", "1", "--out", str(out), "--append-results",
                        "--results-md", str(md)])
    assert payload["sections"] == [] and payload["failures"] == []
    assert [s["section"] for s in payload["skipped"]] == list(acc.SECTIONS)
    assert all(s["reason"].startswith("budget: ") for s in payload["skipped"])
    assert json.loads(out.read_text())["plan_check"].startswith("plan check: OK")
    printed = capsys.readouterr().out
    assert "CorrelationPlan: platform=cpu" in printed and "skipped raster" in printed
    assert "CPU smoke run" in md.read_text() and "Skipped:" in md.read_text()


@pytest.mark.slow
def test_quick_run_every_section(tmp_path):
    """``--quick`` on the CPU: every section runs within a generous budget and gives rows."""
    out, md = tmp_path / "q.json", tmp_path / "RESULTS.md"
    payload = acc.main(["--quick", "--budget-s", "900", "--out", str(out), "--append-results",
                        "--results-md", str(md)])
    assert payload["failures"] == [] and payload["skipped"] == []
    got = {r["section"] for rec in payload["sections"] for r in rec["rows"]}
    assert got == set(acc.SECTIONS)
    for rec in payload["sections"]:
        assert rec["status"] == "ok" and rec["plan"]["platform"] == "cpu"
        for r in rec["rows"]:
            assert r["ours"] > 0 and r["peak"]["rss_mib"] > 0
    assert md.read_text().count("| lsr |") >= 3  # one call, batched, vmapped


def test_cases_skip_when_the_last_case_does_not_fit(tmp_path):
    ctx = acc.Context(section="x", rounds=1, deadline=time.time() + 10, no_torch=True,
                      result=tmp_path / "r.json")
    assert ctx.fits("first")  # the first case always starts
    ctx.cases_done.append(20.0)
    assert not ctx.fits("second")
    ctx.cases_done.append(1.0)
    assert ctx.fits("third") and not ctx.fits("fourth", scale=50.0)
    ctx.add("third", "ms", 2.0)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [s["case"] for s in saved["skipped"]] == ["second", "fourth"]
    assert "~20 s needed (the last case took 20 s)" in saved["skipped"][0]["reason"]
    assert saved["rows"][0]["torch"] == "--no-torch" and not saved["complete"]


def test_a_section_past_its_share_is_stopped(tmp_path):
    args = acc.parse_args(["--quick", "--no-torch"])
    t0 = time.time()
    rec = acc._run_section("raster", args, 2.0, tmp_path)
    assert rec["status"] == "stopped at its budget share (2 s)" and rec["rows"] == []
    assert time.time() - t0 < 10 and not acc._ACTIVE
