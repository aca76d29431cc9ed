"""Circular correlation, its adjoint, box sums and FFT lengths against brute-force loops."""

from __future__ import annotations

import dataclasses
import json
import warnings

import jax
import numpy as np
import pytest

from epilsr.correlate import (
    ROUTES,
    CorrelationPlan,
    box_spread,
    box_sum,
    choose_route,
    circular_correlate,
    circular_correlate_adjoint,
    default_plan,
    fft_size,
    plan_for,
    routes,
)
from tests.reference import box_spread_bf, box_sum_bf, circular_correlate_bf

# Jitted once per shape: one compilation instead of one per primitive (keeps the suite fast).
corr = jax.jit(circular_correlate, static_argnames="route")
adjoint = jax.jit(circular_correlate_adjoint, static_argnames=("map_size", "route"))


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _draw(rng, n_layers, n1, n2, f, b, k1, k2):
    maps = rng.normal(size=(n_layers, n1, n2, f)).astype(np.float32)
    kernels = rng.normal(size=(b, k1, k2, f)).astype(np.float32)
    return maps, kernels


# ------------------------------------------------------------------ circular_correlate


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("k", [1, 2, 4, 7, 12, 13])
def test_correlate_prime_13_k_range(rng, route, k):
    maps, kernels = _draw(rng, 2, 13, 13, 3, 3, k, k)
    got = corr(maps, kernels, route=route)
    assert got.shape == (3, 2, 13, 13)
    assert _rel_err(got, circular_correlate_bf(maps, kernels)) < 1e-5


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "n1,n2,k1,k2",
    [
        (17, 17, 5, 5),
        (29, 29, 7, 7),
        (29, 29, 29, 29),
        (13, 17, 4, 6),  # rectangular maps and kernels
        (17, 11, 17, 1),
        (16, 16, 5, 5),  # smooth N: plain length-N transform, no wrap-padding
        (24, 24, 24, 24),
        (16, 13, 3, 5),  # one smooth axis, one prime axis
        (24, 1, 7, 1),
    ],
)
def test_correlate_vs_loops(rng, route, n1, n2, k1, k2):
    maps, kernels = _draw(rng, 3, n1, n2, 2, 4, k1, k2)
    got = corr(maps, kernels, route=route)
    assert got.shape == (4, 3, n1, n2)
    assert _rel_err(got, circular_correlate_bf(maps, kernels)) < 1e-5


def _odd_shapes(seed: int, count: int):
    """Random odd map/patch sizes with several layers, channels and patches."""
    r = np.random.default_rng(seed)
    for _ in range(count):
        n1, n2 = (int(x) for x in r.choice(np.arange(9, 32, 2), 2))
        k1, k2 = int(r.choice(np.arange(1, n1 + 1, 2))), int(r.choice(np.arange(1, n2 + 1, 2)))
        yield int(r.integers(1, 4)), n1, n2, int(r.choice([1, 3, 5])), int(r.integers(1, 6)), k1, k2


@pytest.mark.parametrize("route", [*ROUTES, "auto"])
@pytest.mark.parametrize("shape", list(_odd_shapes(15, 4)), ids=str)
def test_every_route_exact_on_random_odd_shapes(rng, route, shape):
    """Every route, and "auto" whichever route it takes, equals the float64 loops."""
    maps, kernels = _draw(rng, *shape)
    got = corr(maps, kernels, route=route)
    assert _rel_err(got, circular_correlate_bf(maps, kernels)) < 1e-5


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_auto_exact_under_each_platform_plan(rng, platform):
    """"auto" under each platform's default plan (small and large patches, so that the plans'
    route choices and chunk rules come into play) equals the float64 loops."""
    plan = plan_for(platform=platform)
    for k in (3, 13):
        maps, kernels = _draw(rng, 2, 17, 15, 4, 5, k, k)
        got = circular_correlate(maps, kernels, route="auto", plan=plan)
        assert _rel_err(got, circular_correlate_bf(maps, kernels)) < 1e-5


def test_correlate_large_offset_maps(rng):
    """A large common offset (like raw variances) must not swamp the result beyond float32."""
    maps, kernels = _draw(rng, 1, 23, 23, 2, 2, 5, 5)
    maps = maps + 50.0
    want = circular_correlate_bf(maps, kernels)
    for route in ROUTES:
        assert _rel_err(corr(maps, kernels, route=route), want) < 1e-5


def test_correlate_rejects_bad_shapes():
    with pytest.raises(ValueError, match="larger than the epitome"):
        circular_correlate(np.zeros((1, 5, 5, 1)), np.zeros((1, 6, 2, 1)))
    with pytest.raises(ValueError, match="maps"):
        circular_correlate(np.zeros((1, 5, 5, 2)), np.zeros((1, 3, 3, 1)))
    with pytest.raises(ValueError, match="route"):
        circular_correlate(np.zeros((1, 5, 5, 1)), np.zeros((1, 3, 3, 1)), route="fast")


# ------------------------------------------------------------------ adjoint


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "n1,n2,k1,k2", [(13, 13, 4, 4), (11, 17, 3, 7), (16, 16, 16, 16), (7, 7, 1, 1)]
)
def test_adjoint_dot_product(rng, route, n1, n2, k1, k2):
    """<corr(M, k), g> == <M, adjoint(g, k)> for random M, k, g."""
    maps, kernels = _draw(rng, 2, n1, n2, 3, 4, k1, k2)
    g = rng.normal(size=(4, 2, n1, n2)).astype(np.float32)
    lhs = np.sum(np.asarray(corr(maps, kernels, route=route), np.float64) * g)
    adj = adjoint(g, kernels, map_size=(n1, n2), route=route)
    assert adj.shape == maps.shape
    rhs = np.sum(maps.astype(np.float64) * np.asarray(adj, np.float64))
    norm_out = np.sum(circular_correlate_bf(maps, kernels) ** 2)
    scale = np.sqrt(norm_out * np.sum(g.astype(float) ** 2))
    assert abs(lhs - rhs) <= 1e-5 * scale


@pytest.mark.parametrize("route", ROUTES)
def test_adjoint_vs_loops(rng, route):
    """out[l, m, f] = sum_b sum_u g[b, l, m - u] k[b, u, f], by explicit loops."""
    n1, n2, k1, k2 = 11, 9, 3, 4
    _, kernels = _draw(rng, 1, n1, n2, 2, 3, k1, k2)
    g = rng.normal(size=(3, 2, n1, n2))
    want = np.zeros((2, n1, n2, 2))
    for b in range(3):
        for l in range(2):
            for s1 in range(n1):
                for s2 in range(n2):
                    for i in range(k1):
                        for j in range(k2):
                            m1, m2 = (s1 + i) % n1, (s2 + j) % n2
                            want[l, m1, m2] += g[b, l, s1, s2] * kernels[b, i, j]
    got = adjoint(g.astype(np.float32), kernels, map_size=(n1, n2), route=route)
    assert _rel_err(got, want) < 1e-5


# ------------------------------------------------------------------ box sums


@pytest.mark.parametrize(
    "shape,size", [((13, 13), (5, 5)), ((2, 11, 7), (3, 7)), ((3, 9, 10), (1, 1)), ((8, 8), (8, 8))]
)
def test_box_sum_and_spread_vs_loops(rng, shape, size):
    x = rng.normal(size=shape).astype(np.float32)
    assert _rel_err(box_sum(x, size), box_sum_bf(x, size)) < 1e-5
    assert _rel_err(box_spread(x, size), box_spread_bf(x, size)) < 1e-5


def test_box_sum_axes(rng):
    """Non-trailing axes: [L, N1, N2, Cc] with axes=(1, 2)."""
    x = rng.normal(size=(2, 9, 7, 3)).astype(np.float32)
    want = np.moveaxis(box_sum_bf(np.moveaxis(x, -1, 0), (4, 2)), 0, -1)
    assert _rel_err(box_sum(x, (4, 2), axes=(1, 2)), want) < 1e-5
    want = np.moveaxis(box_spread_bf(np.moveaxis(x, -1, 0), (4, 2)), 0, -1)
    assert _rel_err(box_spread(x, (4, 2), axes=(1, 2)), want) < 1e-5


@pytest.mark.parametrize("shape,size", [((13, 17), (4, 6)), ((2, 9, 9), (9, 2))])
def test_box_spread_is_adjoint_of_box_sum(rng, shape, size):
    x = rng.normal(size=shape)
    y = rng.normal(size=shape)
    lhs = np.sum(np.asarray(box_sum(x.astype(np.float32), size), np.float64) * y)
    rhs = np.sum(x * np.asarray(box_spread(y.astype(np.float32), size), np.float64))
    assert abs(lhs - rhs) <= 1e-5 * np.sqrt(np.sum(x**2) * np.sum(y**2)) * size[0] * size[1]


def test_box_sum_float32_accuracy_with_offset(rng):
    """Box sums of large, nearly constant maps stay accurate (summed directly, no FFT)."""
    x = (1000.0 + rng.normal(size=(31, 31))).astype(np.float32)
    want = box_sum_bf(x, (11, 11))
    assert _rel_err(box_sum(x, (11, 11)), want) < 1e-6


# ------------------------------------------------------------------ fft_size


def _smooth(m: int) -> bool:
    for p in (2, 3, 5, 7):
        while m % p == 0:
            m //= p
    return m == 1


def test_fft_size_is_minimal_7_smooth():
    for n in range(1, 1200):
        m = fft_size(n)
        assert m >= n and _smooth(m), (n, m)
        assert not any(_smooth(t) for t in range(n, m)), (n, m)
    assert fft_size(299 + 10) == 315
    assert fft_size(499) == 500


def test_correlate_runs_under_jit(rng):
    maps, kernels = _draw(rng, 2, 13, 13, 2, 3, 5, 5)
    for route in ROUTES:
        f = jax.jit(lambda m, k, route=route: circular_correlate(m, k, route=route))
        assert _rel_err(f(maps, kernels), circular_correlate_bf(maps, kernels)) < 1e-5


# ------------------------------------------------------------------ route names and the plan


def test_method_alias_and_old_route_names_warn_but_work(rng):
    """``method=`` and the old names ``"hybrid"``/``"dft"`` still work, with a warning."""
    maps, kernels = _draw(rng, 1, 11, 13, 2, 3, 5, 3)
    want = circular_correlate_bf(maps, kernels)
    jitted = jax.jit(circular_correlate, static_argnames=("route", "method"))
    for kwargs in ({"method": "direct"}, {"route": "hybrid"}, {"method": "dft"}):
        with pytest.warns(DeprecationWarning):
            got = jitted(maps, kernels, **kwargs)
        assert _rel_err(got, want) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jitted(maps, kernels, route="dft_rows")


def test_accelerator_plans_have_no_cpu_chunking():
    """A platform without a fitted entry gets the CPU cost model without the CPU-only rules."""
    cpu = plan_for(platform="cpu")
    assert cpu.column_group_bytes is not None and cpu.dft_2d_batch is not None
    for platform in ("gpu", "tpu", "cuda"):
        plan = plan_for(platform=platform)
        assert plan.platform == platform
        assert plan.column_group_bytes is None and plan.dft_2d_batch is None
        assert plan.dft_rows_cost == cpu.dft_rows_cost and plan.chunk_bytes == cpu.chunk_bytes


def test_plan_follows_the_arrays_platform():
    """Concrete arrays: their devices' platform; tracers: the default backend."""
    x = jax.numpy.zeros((2, 3))
    assert plan_for(x).platform == x.devices().pop().platform
    seen = []
    jax.jit(lambda a: seen.append(plan_for(a).platform) or a)(x)
    assert seen == [jax.default_backend()]
    assert plan_for(platform="gpu") == default_plan("gpu")


def test_plan_is_data():
    """The shipped plans.json has every field of the dataclass; plans are frozen, hashable
    (static under jit) and validated."""
    text = (routes.__file__.rsplit("/", 1)[0] + "/plans.json")
    entries = json.loads(open(text).read())
    fields = {f.name for f in dataclasses.fields(CorrelationPlan)} - {"platform"}
    assert "cpu" in entries and set(entries["cpu"]["plan"]) == fields
    plan = plan_for(platform="cpu")
    assert hash(plan) == hash(dataclasses.replace(plan))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.chunk_bytes = 1
    with pytest.raises(ValueError, match="chunk_bytes"):
        dataclasses.replace(plan, chunk_bytes=0)


def test_choose_route_answers_a_valid_route():
    """Over a grid of shapes "auto" names one of the routes (which one is the plan's business
    and is measured by benchmarks/correlate_crossover, not pinned here)."""
    plan = plan_for(platform="cpu")
    for n in (16, 128, 299):
        for k in (1, 3, 7, 15):
            assert choose_route((1, n, n, 8), (64, k, k, 8), plan) in ROUTES


# ------------------------------------------------------------------ dft_rows internals


@pytest.mark.parametrize("block", [1, 3, 5, 17])
def test_dft_rows_blocks_vs_loops(rng, monkeypatch, block):
    """Every output block width T (many blocks, a ragged last block, one block) is exact."""
    monkeypatch.setattr(routes, "_dft_block", lambda n2, k1, k2, f: min(block, n2))
    maps, kernels = _draw(rng, 2, 13, 17, 3, 4, 5, 7)
    got = circular_correlate(maps, kernels, route="dft_rows")
    assert _rel_err(got, circular_correlate_bf(maps, kernels)) < 1e-5


@pytest.mark.parametrize("group,chunked", [(1, False), (2, False), (3, False), (2, True)])
def test_dft_rows_column_groups_vs_loops(rng, monkeypatch, group, chunked):
    """Column groups of g blocks (a scan writing each group in place; the last group shifted
    to end at N2, overlapping the one before), alone and inside batch chunks: values and the
    maps gradient are exact."""
    monkeypatch.setattr(routes, "_dft_block", lambda n2, k1, k2, f: 3)  # N2 = 17: 6 blocks
    monkeypatch.setattr(routes, "_rows_group", lambda *args: group)
    if chunked:  # 5 patches in 3 chunks of 2 (one padded)
        monkeypatch.setattr(routes, "_batch_chunk", lambda b, per_example, cap: (2, 3))
    maps, kernels = _draw(rng, 2, 13, 17, 3, 5, 4, 5)
    got = circular_correlate(maps, kernels, route="dft_rows")
    assert _rel_err(got, circular_correlate_bf(maps, kernels)) < 1e-5
    weights = rng.normal(size=got.shape).astype(np.float32)

    def loss(m, route):
        return (circular_correlate(m, kernels, route=route) * weights).sum()

    assert _rel_err(jax.grad(loss)(maps, "dft_rows"), jax.grad(loss)(maps, "direct")) < 1e-5


def test_dft_rows_column_groups_mixed_dtypes_and_x64(rng, monkeypatch):
    """The group path promotes like the other routes (bfloat16 maps with float32 kernels, as
    a bfloat16 epitome gives) and runs with 64-bit indices and floats enabled."""
    monkeypatch.setattr(routes, "_dft_block", lambda n2, k1, k2, f: 3)
    monkeypatch.setattr(routes, "_rows_group", lambda *args: 2)
    maps, kernels = _draw(rng, 1, 13, 17, 3, 4, 3, 5)
    want = circular_correlate_bf(maps, kernels)
    got = circular_correlate(maps.astype(jax.numpy.bfloat16), kernels, route="dft_rows")
    assert got.dtype == np.float32 and _rel_err(got, want) < 3e-2  # bfloat16 maps
    with jax.enable_x64(True):
        got = circular_correlate(maps, kernels.astype(np.float64), route="dft_rows")
        assert got.dtype == np.float64 and _rel_err(got, want) < 1e-5


def test_dft_rows_group_fits_the_budget():
    """At least one block, at most all of them, more blocks for fewer patches; no budget (an
    accelerator plan): all blocks at once."""
    budget = plan_for(platform="cpu").column_group_bytes
    group = routes._rows_group
    assert group(1, 299, 7, 8, 10**6, 25, 16, 12, budget) == 1  # nothing fits: one block
    assert group(1, 16, 3, 2, 1, 8, 5, 2, budget) == 2  # everything fits: all blocks
    sizes = [group(1, 299, 7, 8, b, 25, 16, 12, budget) for b in (256, 64, 16, 4)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    g = group(1, 299, 7, 8, 64, 25, 16, 12, budget)
    assert 4 * 299 * (2 * 16 * 8 * 7 + 2 * 16 * 64 + 25 * 64) * g <= budget
    assert group(1, 299, 7, 8, 10**6, 25, 16, 12, None) == 12


@pytest.mark.parametrize("route", ["dft_rows", "dft_2d"])
def test_transform_route_chunked_batch_equals_unchunked(rng, route):
    """Memory-bounded batching (chunks of the batch, the last shifted back to overlap the one
    before), set through the plan's byte budget, changes nothing."""
    maps, kernels = _draw(rng, 2, 13, 11, 3, 7, 4, 5)
    plan = plan_for(platform="gpu")  # no CPU-only chunking: only chunk_bytes
    whole = np.asarray(circular_correlate(maps, kernels, route=route, plan=plan))
    assert routes._batch_chunk(7, 100, 1) == (1, 7)
    assert routes._batch_chunk(7, 100, 300) == (3, 3)  # 3 chunks of 3, the last overlapping
    for chunk_bytes in (1, 3000):
        small = dataclasses.replace(plan, chunk_bytes=chunk_bytes)
        got = np.asarray(circular_correlate(maps, kernels, route=route, plan=small))
        np.testing.assert_allclose(got, whole, rtol=1e-6, atol=1e-5)
        assert _rel_err(got, circular_correlate_bf(maps, kernels)) < 1e-5


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("route", ["dft_rows", "dft_2d"])
def test_transform_route_derivatives_match_direct(rng, monkeypatch, route, chunked):
    """Values come from the in-place variant, derivatives from the stacked one (custom JVP):
    reverse mode in the maps and the kernels (training), forward mode in both, and a
    non-linear loss, all equal the direct route's; with and without batch chunks."""
    plan = plan_for(platform="cpu")
    if chunked:  # 5 patches in 3 chunks of 2: overlapping in place, padded when stacked
        monkeypatch.setattr(routes, "_batch_chunk", lambda b, per_example, cap: (2, 3))
        plan = dataclasses.replace(plan, dft_2d_batch=2)
    maps, kernels = _draw(rng, 2, 11, 13, 3, 5, 5, 4)
    weights = rng.normal(size=(5, 2, 11, 13)).astype(np.float32)

    def loss(m, k, route):
        out = circular_correlate(m, k, route=route, plan=plan)
        return (out * weights).sum() + jax.nn.logsumexp(out).sum()

    got = jax.grad(loss, argnums=(0, 1))(maps, kernels, route)
    want = jax.grad(loss, argnums=(0, 1))(maps, kernels, "direct")
    for g, w in zip(got, want, strict=True):
        assert _rel_err(g, w) < 1e-5
    tangents = (rng.normal(size=maps.shape).astype(np.float32),
                rng.normal(size=kernels.shape).astype(np.float32))
    for t in (tangents, (tangents[0], np.zeros_like(kernels)), (np.zeros_like(maps), tangents[1])):
        v, d = jax.jvp(lambda m, k: circular_correlate(m, k, route=route, plan=plan),
                       (maps, kernels), t)
        v0, d0 = jax.jvp(lambda m, k: circular_correlate(m, k, route="direct"),
                         (maps, kernels), t)
        assert _rel_err(v, v0) < 1e-5 and _rel_err(d, d0) < 1e-5


# ------------------------------------------------------------------ dft_2d internals


@pytest.mark.parametrize("blocks", [(1, 1), (3, 5), (5, 3), (13, 17), (4, 17)])
def test_dft_2d_blocks_vs_loops(rng, monkeypatch, blocks):
    """Every output block shape (single rows/columns, ragged last blocks, one block) is exact."""
    monkeypatch.setattr(routes, "_dft2_blocks", lambda *shape: blocks)
    maps, kernels = _draw(rng, 2, 13, 17, 3, 4, 5, 7)
    got = circular_correlate(maps, kernels, route="dft_2d")
    assert _rel_err(got, circular_correlate_bf(maps, kernels)) < 1e-5


@pytest.mark.parametrize("shape,blocks", [
    ((2, 11, 9, 3, 4, 11, 9), (11, 9)),  # K = N: one block, the map's own wrap (P = N)
    ((1, 12, 10, 2, 3, 7, 3), (12, 4)),  # one block along axis 1 only
    ((1, 12, 10, 2, 3, 7, 3), (5, 10)),  # ... along axis 2 only
])
def test_dft_2d_one_block_is_the_circular_transform(rng, monkeypatch, shape, blocks):
    monkeypatch.setattr(routes, "_dft2_blocks", lambda *shape: blocks)
    maps, kernels = _draw(rng, *shape)
    got = circular_correlate(maps, kernels, route="dft_2d")
    assert _rel_err(got, circular_correlate_bf(maps, kernels)) < 1e-5
    for n, k, t in zip(shape[1:3], shape[5:7], blocks, strict=True):
        assert routes._dft_sizes(n, k, t)[1] == (n if t == n else t + k - 1)


def test_dft_2d_blocks_minimise_the_cost_model():
    """Searching only the smallest block per block count loses nothing: the chosen blocks cost
    no more than any (T1, T2) at all."""
    cost = plan_for(platform="cpu").float_cost
    assert routes._block_candidates(10) == [1, 2, 3, 4, 5, 10]  # 10 blocks of 1, 5 of 2, ...
    t1, t2 = routes._dft2_blocks(40, 30, 9, 7, 8, cost)
    best = routes._dft2_cost(40, 30, 9, 7, 8, t1, t2, cost)
    every = [routes._dft2_cost(40, 30, 9, 7, 8, a, c, cost)
             for a in range(1, 41) for c in range(1, 31)]
    assert best <= min(every)
