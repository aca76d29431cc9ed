"""Data-parallel training: sharded step on 4 forced CPU devices and a 2-process run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from epilsr.io import checkpoint
from epilsr.parallel import (
    data_mesh,
    initialize_distributed,
    make_sharded_train_step,
    replicate,
    shard_batch,
    use_cpu_devices,
)
from epilsr.train import make_train_step
from tests._subprocess_worker import (
    DIST_HYPER,
    distributed_batches,
    distributed_optimizer,
    initial_state,
)

WORKER = Path(__file__).with_name("_subprocess_worker.py")


def _leaves(tree) -> list[np.ndarray]:
    out = []
    for x in jax.tree.leaves(tree):
        if jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.asarray(x))
    return out


def _assert_close(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def _single_process_run_with(batches):
    """The reference: the plain (unsharded) step on the same global batches."""
    optimizer = distributed_optimizer()
    state = initial_state(optimizer)
    step = make_train_step(optimizer=optimizer, **DIST_HYPER)
    infos = []
    for batch in batches:
        state, info = step(state, batch)
        infos.append(info)
    return state, infos


@pytest.fixture(scope="module")
def single():
    return _single_process_run_with(distributed_batches())


def test_sharded_step_matches_single_device(single):
    if jax.device_count() < 4:
        pytest.skip(f"needs 4 devices, got {jax.device_count()} (XLA_FLAGS set too late?)")
    mesh = jax.make_mesh((4,), ("data",))  # Explicit axes by default: converted to Auto
    optimizer = distributed_optimizer()
    step = make_sharded_train_step(mesh, optimizer=optimizer, **DIST_HYPER)
    state = replicate(initial_state(optimizer), mesh)
    batches = distributed_batches()
    # The worst quarter of the first batch (4 of 16 patches) lives entirely on device 0's
    # shard: a per-device quantile would pick one per shard and differ from the global one.
    batches[0][:4] += 3.0
    infos = []
    for batch in batches:
        patches = shard_batch(batch, mesh)
        assert patches.sharding.spec == PartitionSpec("data")
        assert len(patches.addressable_shards) == 4
        state, info = step(state, patches)
        infos.append(info)
    assert state.params.mean.sharding.is_fully_replicated
    assert state.counters.sharding.is_fully_replicated

    want_state, want_infos = _single_process_run_with(batches)
    _assert_close(state, want_state)
    for got, want in zip(infos, want_infos, strict=True):
        _assert_close(got, want)

    # The compiled step really is data-parallel: the batch stays split and the gradient and
    # counter increments are combined across devices by collectives.
    hlo = step.lower(state, shard_batch(batches[0], mesh)).compile().as_text()
    assert "all-reduce" in hlo or "reduce-scatter" in hlo or "all-gather" in hlo


def test_sharded_step_validation():
    mesh = jax.make_mesh((1,), ("batch",), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="'data'"):
        make_sharded_train_step(mesh, optimizer=distributed_optimizer())
    assert initialize_distributed(None, 1, 0) == 0  # a single process is a no-op
    with pytest.raises(ValueError, match="process_id"):
        initialize_distributed("127.0.0.1:1", 2, 5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_run_matches_single_process(tmp_path, single):
    """Two ``jax.distributed`` processes on loopback, 2 CPU devices each (gloo collectives)."""
    port = _free_port()
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "distributed",
                "--process-id",
                str(i),
                "--num-processes",
                "2",
                "--port",
                str(port),
                "--out",
                str(tmp_path / f"p{i}.npz"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=120))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(
            "2-process run timed out:\n"
            + "\n".join((p.communicate()[1] or "")[-2000:] for p in procs)
        )
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, f"process failed ({p.returncode}):\n{out}\n{err[-4000:]}"
        assert "DEVICES 4 LOCAL 2" in out, out

    want, _ = single
    for i in range(2):
        got = checkpoint.restore(tmp_path / f"p{i}.npz", want)
        _assert_close(got, want)


def test_replicate_keeps_typed_keys():
    mesh = data_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count()
    state = replicate(initial_state(distributed_optimizer()), mesh)
    assert jax.numpy.issubdtype(state.key.dtype, jax.dtypes.prng_key)
    assert state.key.sharding == NamedSharding(mesh, PartitionSpec())
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state))


@pytest.mark.parametrize("route,pieces", [
    ("dft_rows", False), ("dft_rows", True), ("dft_2d", False), ("dft_2d", True), ("fft", False),
    ("direct", False),
])
def test_sharded_likelihood_route_matches_single_device(monkeypatch, route, pieces):
    """The shard_map'd likelihood (each device correlates its own patches) gives the same
    step as one device, with the transform routes too (``pieces``: forced into batch chunks
    and column groups, i.e. scans whose carry varies over the mesh), and keeps the batch
    split."""
    if jax.device_count() < 4:
        pytest.skip(f"needs 4 devices, got {jax.device_count()}")
    import optax

    if pieces:
        import dataclasses

        import epilsr.correlate as correlate
        from epilsr.correlate import routes

        pieces_plan = dataclasses.replace(correlate.default_plan("cpu"), dft_2d_batch=2)
        monkeypatch.setattr(correlate, "plan_for", lambda *arrays, **kw: pieces_plan)
        monkeypatch.setattr(routes, "_batch_chunk", lambda b, per_example, cap: (2, -(-b // 2)))
        monkeypatch.setattr(routes, "_dft_block", lambda n2, k1, k2, f: 3)
        monkeypatch.setattr(routes, "_rows_group", lambda *args: 1)

    from epilsr import init_epitome
    from epilsr.train import train_init

    optimizer = optax.sgd(0.1)
    hyper = dict(temperature=4.0, quantile=0.5, promotion_threshold=0.05, route=route)
    epi = init_epitome(jax.random.key(3), size=12, channels=2, mean=0.5)
    rng = np.random.default_rng(7)
    batches = [rng.uniform(size=(16, 5, 5, 2)).astype(np.float32) for _ in range(2)]
    single = make_train_step(optimizer=optimizer, **hyper)
    state = train_init(jax.random.key(0), epi, optimizer)
    for b in batches:
        state, info = single(state, b)
    mesh = data_mesh(jax.devices()[:4])
    sharded = make_sharded_train_step(mesh, optimizer=optimizer, **hyper)
    sstate = replicate(train_init(jax.random.key(0), epi, optimizer), mesh)
    for b in batches:
        sstate, sinfo = sharded(sstate, shard_batch(b, mesh))
    _assert_close(sstate, state)
    _assert_close(sinfo, info)
    # No [B, ...] patch or likelihood array is gathered onto every device: the only
    # all-gather allowed is the [B] score vector of the global worst-quantile selection.
    hlo = sharded.lower(sstate, shard_batch(batches[0], mesh)).compile().as_text()
    gathers = [line for line in hlo.splitlines() if " all-gather(" in line]
    assert all("f32[16]" in line.split("=")[1].split()[0] for line in gathers), gathers


@pytest.mark.parametrize("bad", [0, -2, "many", 2.5, True])
def test_use_cpu_devices_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match=r"^cpu_devices: expected a positive integer, 'auto' or "):
        use_cpu_devices(bad)


def test_use_cpu_devices_once_jax_has_started():
    """This process started with 4 forced CPU devices (conftest): ``auto`` and the same count
    keep them, ``None`` leaves them alone, another count is an error naming the key."""
    have = len(jax.devices("cpu"))
    assert have == 4
    assert use_cpu_devices(None) is None
    assert use_cpu_devices("auto") == have and use_cpu_devices(have) == have
    with pytest.raises(ValueError, match=r"^cpu_devices: JAX has already started with 4 CPU "
                                         r"devices, expected 3; set it before"):
        use_cpu_devices(3)


def test_use_cpu_devices_in_a_fresh_process():
    """Before JAX starts, the count is applied (over ``XLA_FLAGS``' forced 4 devices)."""
    code = ("import jax; from epilsr.parallel import use_cpu_devices; "
            "n = use_cpu_devices(3); print(n, len(jax.devices()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["3", "3"]
