"""``benchmarks/train_throughput.py``: its device-scaling rows run (tiny sizes, 2 of the 4
forced CPU devices) and compare the sharded step with the single-device one."""

from __future__ import annotations

import importlib

import optax

from epilsr import train


def test_scaling_rows_run_and_match_the_single_device_step(monkeypatch):
    bench = importlib.import_module("benchmarks.train_throughput")
    monkeypatch.setattr(bench, "N", 24)
    monkeypatch.setattr(bench, "BATCH", 8)
    optimizer = optax.adam(3e-3)
    state0 = bench._initial_state(optimizer)
    step = train.make_train_step(optimizer=optimizer)
    out = bench.scale(5, "1,2", state0, optimizer, step, steps=1, sgd_check=True,
                      collectives_=True)
    assert sorted(out) == ["1", "2"]
    assert out["1"]["max_abs_diff"] == 0.0  # one device: the same program
    assert out["2"]["sgd_max_abs_diff_vs_single"]["mean"] < 1e-6  # reduction order only
    assert out["2"]["all_gathers"] == []  # no batch-sharded intermediate replicated
    assert out["2"]["step_s"] > 0 and out["2"]["speedup_vs_1"] > 0
