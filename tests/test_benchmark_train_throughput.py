"""``benchmarks/train_throughput.py``: its device-scaling row runs (tiny sizes, 2 of the 4
forced CPU devices) and compares the sharded step with the single-device one."""

from __future__ import annotations

import importlib

import optax

from epilsr import train


def test_scaling_row_runs_and_matches_the_single_device_step(monkeypatch):
    bench = importlib.import_module("benchmarks.train_throughput")
    monkeypatch.setattr(bench, "N", 24)
    monkeypatch.setattr(bench, "BATCH", 8)
    optimizer = optax.adam(3e-3)
    state0 = bench._initial_state(optimizer)
    step = train.make_train_step(optimizer=optimizer)
    out = bench.scale(5, "2", state0, optimizer, step, steps=1, sgd_check=True,
                      collectives_=False)
    assert sorted(out) == ["2"] and out["2"]["step_s"] > 0
    assert out["2"]["sgd_max_abs_diff_vs_single"]["mean"] < 1e-6  # reduction order only
    assert out["2"]["counters_max_abs_diff"] < 1e-5
