"""The four correlation routes behind :func:`epilsr.correlate.circular_correlate`.

Each computes, for ``maps [L, N1, N2, F]`` and ``kernels [B, K1, K2, F]``,

    out[b, l, s1, s2] = sum_{i, j, f} maps[l, (s1 + i) % N1, (s2 + j) % N2, f] * kernels[b, i, j, f]

* ``"direct"``: wrap-pad the maps by ``K - 1`` and run one ``lax.conv`` whose output channels
  are the patches (``O(B L N^2 K^2 F)``, best for small ``K``);
* ``"dft_rows"``: block DFTs (as matrix products) along one axis, direct sums over the ``K1``
  row offsets along the other (moderate ``K``);
* ``"dft_2d"``: block DFTs along both axes, all of them matrix products, and one small product
  per frequency summing the ``F`` channels (large ``K``);
* ``"fft"``: wrap-pad the maps to ``N + K - 1``, zero-pad both sides to a smooth FFT length
  ``M >= N + K - 1`` (prime ``N`` such as 299 or 499 never hits a slow transform), multiply
  in the frequency domain, sum over the ``F`` feature channels *before* the single inverse
  transform per (patch, layer) (``O((B + L) F M^2 log M + B L F M^2)``).

The two block-DFT routes work in pieces whose sizes a :class:`~epilsr.correlate.CorrelationPlan`
bounds (batch chunks; on the CPU also column groups and small chunks, which glibc then reuses
between calls instead of mapping fresh, page-faulting memory each time); values are written in
place, derivatives go through the stacked variant (a custom JVP: both routes are bilinear).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from epilsr.correlate.plan import CorrelationPlan, plan_for

__all__ = [
    "ROUTES",
    "correlate_direct",
    "correlate_dft_2d",
    "correlate_dft_rows",
    "correlate_fft",
    "dft_2d_cost",
    "fft_size",
    "route_flops",
    "wrap_pad",
]

ROUTES = ("direct", "dft_rows", "dft_2d", "fft")

_HIGHEST = lax.Precision.HIGHEST


@functools.cache
def fft_size(n: int) -> int:
    """Smallest 7-smooth integer ``>= n`` (a fast length for any FFT library)."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def wrap_pad(
    x: jax.Array, axes: tuple[int, int], lengths: tuple[int, int], starts: tuple[int, int] = (0, 0)
) -> jax.Array:
    """Circular extension: ``out[..., t1, t2, ...] = x[..., (t1 + a1) % N1, (t2 + a2) % N2, ...]``.

    Args:
      x: array with spatial axes ``axes``.
      axes: the two spatial axes.
      lengths: output lengths along ``axes``.
      starts: offsets ``(a1, a2)`` of the first output index (may be negative).
    """
    for ax, length, start in zip(axes, lengths, starts, strict=True):
        n = x.shape[ax]
        idx = (jnp.arange(length) + start) % n
        x = jnp.take(x, idx, axis=ax)
    return x


def correlate_direct(maps: jax.Array, kernels: jax.Array) -> jax.Array:
    _, n1, n2, _ = maps.shape
    _, k1, k2, _ = kernels.shape
    padded = wrap_pad(maps, (1, 2), (n1 + k1 - 1, n2 + k2 - 1))
    rhs = jnp.transpose(kernels, (1, 2, 3, 0))  # [K1, K2, F, B]
    out = lax.conv_general_dilated(
        padded,
        rhs,
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=_HIGHEST,
    )  # [L, N1, N2, B]
    return jnp.transpose(out, (3, 0, 1, 2))


def _fft_length(n: int, k: int) -> tuple[int, bool]:
    """FFT length along one axis and whether the maps need wrap-padding first."""
    padded = fft_size(n + k - 1)
    if fft_size(n) == n and n <= padded:
        return n, False  # n is already smooth: a plain circular transform of length n
    return padded, True


def correlate_fft(maps: jax.Array, kernels: jax.Array) -> jax.Array:
    _, n1, n2, _ = maps.shape
    _, k1, k2, _ = kernels.shape
    m1, pad1 = _fft_length(n1, k1)
    m2, pad2 = _fft_length(n2, k2)
    if pad1 or pad2:
        maps = wrap_pad(maps, (1, 2), (n1 + k1 - 1 if pad1 else n1, n2 + k2 - 1 if pad2 else n2))
    # Channel-first so the transforms run over the trailing axes.
    a = jnp.fft.rfft2(jnp.moveaxis(maps, -1, 1), s=(m1, m2))  # [L, F, M1, M2r]
    p = jnp.fft.rfft2(jnp.moveaxis(kernels, -1, 1), s=(m1, m2))  # [B, F, M1, M2r]
    prod = jnp.einsum("lfxy,bfxy->blxy", a, jnp.conj(p), precision=_HIGHEST)
    out = jnp.fft.irfft2(prod, s=(m1, m2))
    return out[..., :n1, :n2]


def _batch_chunk(batch: int, per_example_bytes: int, chunk_bytes: int) -> tuple[int, int]:
    """``(chunk, n_chunks)``: equal chunks of the batch, each under ``chunk_bytes``."""
    chunk = max(1, min(batch, chunk_bytes // max(per_example_bytes, 1)))
    n_chunks = -(-batch // chunk)
    return -(-batch // n_chunks), n_chunks


def _map_batch(
    fn, kernels: jax.Array, chunk: int, n_chunks: int, in_place: bool, like: tuple = ()
) -> jax.Array:
    """``fn`` over ``kernels`` in ``n_chunks`` chunks of ``chunk``.

    ``in_place``: each chunk is written into the ``[B, ...]`` result (a scan; the last chunk is
    shifted back to end at ``B``, overlapping the one before): no stacked copy of the outputs,
    the fastest forward pass. Otherwise ``lax.map`` over zero-padded chunks and a concatenation,
    whose transpose (reverse mode) is much cheaper than the in-place scan's; the routes use it
    for derivatives (see :func:`_bilinear`). ``like``: other arrays ``fn`` reads (the maps),
    for the in-place buffer's ``shard_map`` type."""
    b = kernels.shape[0]
    if n_chunks == 1:
        return fn(kernels)
    if not in_place:
        pad = n_chunks * chunk - b
        kernels = jnp.pad(kernels, ((0, pad),) + ((0, 0),) * (kernels.ndim - 1))
        out = lax.map(fn, kernels.reshape(n_chunks, chunk, *kernels.shape[1:]))
        return out.reshape(n_chunks * chunk, *out.shape[2:])[:b]
    starts = np.minimum(np.arange(n_chunks) * chunk, b - chunk)
    shape = jax.eval_shape(fn, jax.ShapeDtypeStruct((chunk, *kernels.shape[1:]), kernels.dtype))
    return _scan_in_place(
        lambda start: fn(lax.dynamic_slice_in_dim(kernels, start, chunk, axis=0)),
        starts, (b, *shape.shape[1:]), shape.dtype, 0, (kernels, *like),
    )


def _varying_like(x: jax.Array, *like: jax.Array) -> jax.Array:
    """``x`` typed as varying over every ``shard_map`` mesh axis that one of ``like`` varies
    over (no data moves; a no-op outside ``shard_map``), so that a scan carry started from
    constants has the type of the values written into it."""
    axes: set = set()
    for a in like:
        aval = jax.typeof(a)
        manual = getattr(aval, "manual_axis_type", None)
        axes |= set(manual.varying if manual is not None else getattr(aval, "vma", ()))
    if not axes:
        return x
    axes = tuple(sorted(axes))
    return lax.pcast(x, axes, to="varying") if hasattr(lax, "pcast") else lax.pvary(x, axes)


def _scan_in_place(piece, starts: np.ndarray, shape: tuple, dtype, axis: int, like) -> jax.Array:
    """``piece(start)`` for each start, written at ``start`` along ``axis`` of one ``shape``
    buffer (a scan updating it in place). ``like``: the arrays the pieces are computed from,
    whose ``shard_map`` variance the buffer must share."""

    def body(out, start):
        return lax.dynamic_update_slice_in_dim(out, piece(start), start, axis), None

    out = _varying_like(jnp.zeros(shape, dtype), *like)
    return lax.scan(body, out, jnp.asarray(starts, jnp.int32))[0]


def _bilinear(impl):
    """``impl(maps, kernels, in_place)`` (bilinear in ``maps`` and ``kernels``) as a function
    of ``(maps, kernels)`` whose values come from the in-place variant and whose derivatives
    from the other one: ``d(out) = impl(dmaps, kernels) + impl(maps, dkernels)``, which reverse
    mode transposes without carrying the whole output through a scan (measured several times
    faster for the maps gradient; benchmarks/RESULTS.md)."""

    @jax.custom_jvp
    def f(maps, kernels):
        return impl(maps, kernels, True)

    def jvp(primals, tangents):
        maps, kernels = primals
        d_maps, d_kernels = tangents
        out = impl(maps, kernels, True)
        parts = []
        if not isinstance(d_maps, SymbolicZero):
            parts.append(impl(d_maps, kernels, False))
        if not isinstance(d_kernels, SymbolicZero):
            parts.append(impl(maps, d_kernels, False))
        tangent = functools.reduce(jnp.add, parts) if parts else jnp.zeros_like(out)
        return out, tangent

    f.defjvp(jvp, symbolic_zeros=True)
    return f


@functools.cache
def _dft_block(n2: int, k1: int, k2: int, f: int) -> int:
    """Output block ``T`` along axis 2 of ``"dft_rows"``: fewest multiply-adds per position.

    Per block of ``T`` outputs the route does ``8 K1 F`` flops for each of the ``W = P//2 + 1``
    frequencies of a length ``P = T + K2 - 1`` transform (the products) and ``4 W T`` (the
    inverse), plus a pass over the block's outputs (counted as 64 flops each).
    """
    best, best_cost = n2, math.inf
    for t in range(1, n2 + 1):
        nb = -(-n2 // t)
        if t > 1 and -(-n2 // (t - 1)) == nb:
            continue  # same block count with less padding: only the smallest T per count
        w = (t + k2 - 1) // 2 + 1
        cost = nb * (8 * w * k1 * f + 4 * w * t + 64 * t)
        if cost < best_cost:
            best, best_cost = t, cost
    return best


def _real_dft(length: int, size: int, freqs: int) -> tuple[np.ndarray, np.ndarray]:
    """``cos, sin`` of ``2 pi u w / length`` for ``u < size``, ``w < freqs`` (float64)."""
    theta = 2.0 * np.pi * np.outer(np.arange(size), np.arange(freqs)) / length
    return np.cos(theta), np.sin(theta)


def _complex_form(cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """``[..., 2, 2]`` real form ``m[..., c_in, c_out]`` of multiplying by ``cos + i sin``
    (index 0: real part, 1: imaginary part)."""
    return np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], -2)


def _half_spectrum_weights(p_len: int) -> np.ndarray:
    """``[P//2 + 1]`` weights of the inverse real DFT of length ``P`` from its half spectrum:
    1 for ``w = 0`` (and ``P/2`` when ``P`` is even), 2 for the frequencies that stand for a
    conjugate pair."""
    weight = np.full(p_len // 2 + 1, 2.0)
    weight[0] = 1.0
    if p_len % 2 == 0:
        weight[-1] = 1.0
    return weight


def _rows_group(
    lyr: int, n1: int, k1: int, f: int, b: int, t: int, w: int, nb: int,
    group_bytes: int | None, itemsize: int = 4,
) -> int:
    """Output blocks per column group of ``"dft_rows"``: the most whose largest temporaries
    (the spectra at the ``K1`` row offsets, the per-frequency products and the inverse, for
    ``b`` patches) fit in ``group_bytes``; at least 1, at most ``nb`` (``nb`` when
    ``group_bytes`` is ``None``: no column groups)."""
    if group_bytes is None:
        return nb
    per_block = itemsize * lyr * n1 * (2 * w * f * k1 + 2 * w * b + t * b)
    return max(1, min(nb, group_bytes // per_block))


def _dft_rows_impl(
    maps: jax.Array, kernels: jax.Array, in_place: bool, plan: CorrelationPlan
) -> jax.Array:
    """Block DFTs along the second spatial axis, direct sums along the first; all products.

    The ``N2`` outputs along axis 2 are cut into ``nb`` blocks of ``T``; block ``t`` needs the
    wrap-padded map segment ``maps[:, :, tT : tT + P]``, ``P = T + K2 - 1``, and a length-``P``
    real DFT makes the correlation along axis 2 a product per frequency ``w < W = P//2 + 1``
    (``P >= T + K2 - 1``: no circular aliasing). Along axis 1 the ``K1`` row offsets are summed
    directly, so per frequency one real matrix product

        out[w, (q, b), (l, t, s1)] = sum_{(i, p, f)} rhs[w, (i, p, f), (q, b)]
                                                      lhs[w, (l, t, s1), (i, p, f)]

    does the work (``p``/``q``: real and imaginary parts of ``A conj(X)``), and the inverse
    transform is one more product with the ``[2W, T]`` inverse-DFT matrix. Every transform is
    a matrix product (a DFT of the ``K2`` non-zero columns of a patch, of the epitome's segments
    once per call), so the route runs at the machine's matrix-multiply rate with
    ``~(8 K1 F + 4 T) W nb`` flops per output row against ``2 K1 K2 F N2`` for the direct one.
    With ``in_place``, blocks are processed in column groups of :func:`_rows_group` blocks (a
    scan writing each group's columns in place; the last group is shifted left to end at
    ``N2``), which keeps the temporaries small enough to be reused between calls instead of
    page-faulted afresh; derivatives use all blocks at once (see :func:`_bilinear`).
    """
    lyr, n1, n2, f = maps.shape
    b, k1, k2, _ = kernels.shape
    t = _dft_block(n2, k1, k2, f)
    nb = -(-n2 // t)
    p_len = t + k2 - 1
    w = p_len // 2 + 1
    dtype = maps.dtype
    cos_p, sin_p = _real_dft(p_len, p_len, w)
    fwd = jnp.asarray(np.stack([cos_p, -sin_p], axis=-1), dtype)  # [P, W, 2]: Re, Im of e^-i
    # Patch side: X = DFT of the K2 non-zero columns; rhs is the real form of conj(X).
    cos_k, sin_k = _real_dft(p_len, k2, w)
    pat = jnp.asarray(_complex_form(cos_k, sin_k), dtype)  # [K2, W, p, q]
    # Inverse real DFT of length P, outputs u < T: weights 1 (w = 0, P/2), 2 otherwise.
    cos_t, sin_t = _real_dft(p_len, t, w)
    weight = _half_spectrum_weights(p_len) / p_len
    inv = np.stack([cos_t.T, -sin_t.T], axis=1) * weight[:, None, None]  # [W, 2, T]
    inv_t = jnp.asarray(inv.reshape(2 * w, t).T, dtype)  # [T, (w, q)]
    # Wrap-padded rows (the K1 offsets) and columns (every group's segments).
    rows = np.arange(n1 + k1 - 1) % n1

    def segment_rows(seg: jax.Array) -> jax.Array:
        """``[L, N1 + K1 - 1, g, P, F]`` segments of ``g`` consecutive blocks -> their spectra
        at the ``K1`` row offsets, ``[W, (l, t, s1), (i, p, f)]``."""
        g = seg.shape[2]
        spec = jnp.einsum("lrtuf,uwp->wltrpf", seg, fwd, precision=_HIGHEST)
        if k1 > 8:  # one gather of the K1 row offsets (measured faster for large K1)
            lhs = spec[:, :, :, np.arange(n1)[:, None] + np.arange(k1)[None, :]]
        else:  # a few slices: cheaper than the gather
            lhs = jnp.stack([spec[:, :, :, i : i + n1] for i in range(k1)], axis=4)
        return lhs.reshape(w, lyr * g * n1, k1 * 2 * f)

    def patch_spectra(ker: jax.Array) -> jax.Array:
        """``[bc, K1, K2, F]`` patches -> ``rhs [W, (i, p, f), (q, b)]``."""
        rhs = jnp.einsum("bijf,jwpq->wipfqb", ker, pat, precision=_HIGHEST)
        return rhs.reshape(w, k1 * 2 * f, 2 * ker.shape[0])

    def blocks(rhs: jax.Array, lhs: jax.Array) -> jax.Array:
        """A chunk's ``rhs`` and a group's ``lhs`` -> ``[bc, L, N1, g T]``."""
        bc, g = rhs.shape[2] // 2, lhs.shape[1] // (lyr * n1)
        out = jnp.einsum("wkb,wnk->wbn", rhs, lhs, precision=_HIGHEST)  # [W, 2 bc, L g N1]
        out = out.reshape(w * 2, bc * lyr * g * n1)
        # [T, 2W] x [2W, (bc, L, g, N1)]: the products' output is used in place, as laid out.
        res = jnp.matmul(inv_t, out, precision=_HIGHEST).reshape(t, bc, lyr, g, n1)
        return res.transpose(1, 2, 4, 3, 0).reshape(bc, lyr, n1, g * t)

    per_example = 4 * lyr * nb * n1 * (4 * w + 2 * t)
    chunk, n_chunks = _batch_chunk(b, per_example, plan.chunk_bytes)
    out_dtype = jnp.result_type(dtype, kernels.dtype)
    g = nb
    if in_place:
        g = _rows_group(lyr, n1, k1, f, chunk, t, w, nb, plan.column_group_bytes,
                        out_dtype.itemsize)
    if g == nb:  # one group: every block at once
        cols = (np.arange(nb)[:, None] * t + np.arange(p_len)[None, :]).ravel() % n2
        seg = jnp.take(jnp.take(maps, rows, axis=1), cols, axis=2)
        lhs = segment_rows(seg.reshape(lyr, n1 + k1 - 1, nb, p_len, f))  # once per call

        def all_blocks(ker: jax.Array) -> jax.Array:
            return blocks(patch_spectra(ker), lhs)[..., :n2]

        return _map_batch(all_blocks, kernels, chunk, n_chunks, in_place, (maps,))

    # Groups of g blocks: columns [s, s + g T) for s = 0, gT, ..., the last one n2 - g T.
    n_groups = -(-nb // g)
    starts = np.minimum(np.arange(n_groups) * g * t, n2 - g * t)
    padded = jnp.take(jnp.take(maps, rows, axis=1), np.arange(n2 + k2 - 1) % n2, axis=2)
    seg_cols = (np.arange(g)[:, None] * t + np.arange(p_len)[None, :]).ravel()

    def chunk_fn(ker: jax.Array) -> jax.Array:
        rhs = patch_spectra(ker)  # once per chunk, not per group

        def group(start):
            win = lax.dynamic_slice_in_dim(padded, start, g * t + k2 - 1, axis=2)
            seg = jnp.take(win, seg_cols, axis=2).reshape(lyr, n1 + k1 - 1, g, p_len, f)
            return blocks(rhs, segment_rows(seg))

        shape = (ker.shape[0], lyr, n1, n2)
        return _scan_in_place(group, starts, shape, out_dtype, 3, (ker, maps))

    return _map_batch(chunk_fn, kernels, chunk, n_chunks, in_place, (maps,))


@functools.cache
def _dft_rows_route(plan: CorrelationPlan):
    """``"dft_rows"`` under ``plan`` as a ``(maps, kernels)`` function (see :func:`_bilinear`)."""
    return _bilinear(functools.partial(_dft_rows_impl, plan=plan))


def correlate_dft_rows(maps: jax.Array, kernels: jax.Array, plan: CorrelationPlan) -> jax.Array:
    """``"dft_rows"``, with the direct sums along the axis of the patches' shorter side."""
    route = _dft_rows_route(plan)
    if kernels.shape[1] <= kernels.shape[2]:
        return route(maps, kernels)
    out = route(jnp.swapaxes(maps, 1, 2), jnp.swapaxes(kernels, 1, 2))
    return jnp.swapaxes(out, 2, 3)


def _dft_sizes(n: int, k: int, t: int) -> tuple[int, int, int]:
    """``(blocks, P, W)`` of ``"dft_2d"`` along one axis with output blocks of ``t``.

    A block of ``T < N`` outputs needs a segment of ``P = T + K - 1`` (a linear correlation
    inside a circular one); one block of all ``N`` outputs (``K <= N``) is the circular
    correlation itself, of length ``P = N``.
    """
    p_len = n if t >= n and k <= n else t + k - 1
    return -(-n // t), p_len, p_len // 2 + 1


def _dft2_work(n1, n2, k1, k2, f, t1, t2, lyr=1) -> tuple[int, int, int]:
    """Per-patch ``(transform flops, per-frequency product flops, floats)`` of
    :func:`_dft_2d_impl` with ``lyr`` layers: the patch DFT and the two inverse products;
    the ``[2 blk, 2F] x [2F, B]`` products; the floats of the patch spectrum, the products,
    the half-inverted products and the output."""
    nb1, p1, _ = _dft_sizes(n1, k1, t1)
    nb2, p2, w2 = _dft_sizes(n2, k2, t2)
    nblk = lyr * nb1 * nb2
    transforms = (
        4 * k1 * k2 * f * w2  # patch DFT along axis 2 (real -> half spectrum)
        + 8 * p1 * k1 * f * w2  # ... and along axis 1 (complex)
        + 8 * w2 * t1 * p1 * nblk  # inverse along axis 1 (complex, outputs < T1)
        + 4 * t2 * w2 * t1 * nblk  # inverse along axis 2 (real outputs < T2)
    )
    products = 8 * p1 * w2 * nblk * f
    floats = 2 * p1 * w2 * f + 2 * p1 * w2 * nblk + 2 * w2 * t1 * nblk + 2 * t1 * t2 * nblk
    return transforms, products, floats


def _dft2_cost(
    n1: int, n2: int, k1: int, k2: int, f: int, t1: int, t2: int, float_cost: float
) -> float:
    """Modelled per-patch cost of :func:`_dft_2d_impl` (one layer) in flops: its arithmetic,
    the per-frequency products counted twice (tiny products run at about half the rate of the
    others; fitted), plus ``float_cost`` per float moved (:func:`_dft2_work`; the route is
    bound by its passes over memory)."""
    transforms, products, floats = _dft2_work(n1, n2, k1, k2, f, t1, t2)
    return float(transforms + 2 * products + float_cost * floats)


def _block_candidates(n: int) -> list[int]:
    """Output block lengths worth trying along an axis: the smallest per block count."""
    return [t for t in range(1, n + 1) if t == 1 or -(-n // (t - 1)) != -(-n // t)]


@functools.cache
def _dft2_blocks(
    n1: int, n2: int, k1: int, k2: int, f: int, float_cost: float
) -> tuple[int, int]:
    """Output blocks ``(T1, T2)`` of :func:`_dft_2d_impl` with the least modelled cost."""
    best, best_cost = (n1, n2), math.inf
    for t1 in _block_candidates(n1):
        for t2 in _block_candidates(n2):
            cost = _dft2_cost(n1, n2, k1, k2, f, t1, t2, float_cost)
            if cost < best_cost:
                best, best_cost = (t1, t2), cost
    return best


def _dft_2d_impl(
    maps: jax.Array, kernels: jax.Array, in_place: bool, plan: CorrelationPlan
) -> jax.Array:
    """Block DFTs along both spatial axes, every transform and product a matrix product.

    The outputs are cut into ``nb1 x nb2`` blocks of ``T1 x T2``; block ``(a, c)`` needs the
    wrap-padded map segment of ``P1 x P2 = (T1 + K1 - 1) x (T2 + K2 - 1)``, on which the
    correlation is circular without aliasing (along an axis with one block of all ``N``
    outputs, the map itself, ``P = N``: its own wrap-around is the one wanted). With the
    segments' 2-D DFTs ``A`` (once per
    call; real DFT along axis 2, ``W2 = P2//2 + 1`` frequencies) and the patches' ``X`` (a DFT
    of the ``K1 x K2`` non-zero entries), each frequency needs ``sum_f A conj(X)``: one small
    real product ``[2 L nb1 nb2, 2F] x [2F, B]`` per frequency. Two matrix products invert the
    transforms (axis 1, complex, outputs ``< T1``; axis 2, real, outputs ``< T2``). Unlike
    ``"dft_rows"`` the size of each per-frequency product no longer grows with ``K1`` (no direct
    sum over row offsets), which wins for large patches; :func:`_dft2_blocks` picks the blocks.
    Patches go in batch chunks (at most ``plan.dft_2d_batch``), written in place for
    values and stacked for derivatives (``in_place``, see :func:`_bilinear`).
    """
    lyr, n1, n2, f = maps.shape
    b, k1, k2, _ = kernels.shape
    t1, t2 = _dft2_blocks(n1, n2, k1, k2, f, plan.float_cost)
    nb1, p1, _ = _dft_sizes(n1, k1, t1)
    nb2, p2, w2 = _dft_sizes(n2, k2, t2)
    nblk = lyr * nb1 * nb2
    dtype = maps.dtype

    # Epitome side, once per call: A[w2, w1, (q, blk), (p, f)], the real form of A conj(.)
    # (q: real / imaginary part of the product; p: real / imaginary part of X).
    rows = (np.arange(nb1)[:, None] * t1 + np.arange(p1)[None, :]).ravel() % n1
    cols = (np.arange(nb2)[:, None] * t2 + np.arange(p2)[None, :]).ravel() % n2
    seg = jnp.take(jnp.take(maps, rows, axis=1), cols, axis=2)
    seg = seg.reshape(lyr, nb1, p1, nb2, p2, f)
    cos2, sin2 = _real_dft(p2, p2, w2)
    fwd2 = np.stack([cos2, -sin2], -1)  # [P2 (u), W2, 2]: Re, Im of e^-i
    half = jnp.einsum("lavbuf,uwc->wclabvf", seg, jnp.asarray(fwd2, dtype), precision=_HIGHEST)
    cos1, sin1 = _real_dft(p1, p1, p1)
    fwd1 = _complex_form(cos1, -sin1)  # [P1 (u), P1 (w), 2, 2]
    spec = jnp.einsum("wclabvf,vxcd->wxlabdf", half, jnp.asarray(fwd1, dtype), precision=_HIGHEST)
    spec = spec.reshape(w2, p1, nblk, 2, f)
    re, im = spec[:, :, :, 0], spec[:, :, :, 1]
    lhs = jnp.stack([jnp.concatenate([re, im], -1), jnp.concatenate([im, -re], -1)], axis=2)
    lhs = lhs.reshape(w2, p1, 2 * nblk, 2 * f)

    # Patch side: DFT of the K1 x K2 non-zero entries (the first rows of the same matrices),
    # axis 2 then axis 1 (complex).
    fwd_k2 = jnp.asarray(fwd2[:k2], dtype)  # [K2, W2, 2]
    fwd_k1 = fwd1[:k1].transpose(1, 3, 2, 0).reshape(2 * p1, 2 * k1)
    fwd_k1 = jnp.asarray(fwd_k1, dtype)  # [(w1, p), (c, i)]
    # Inverse along axis 1 (complex, outputs u1 < T1): [(d, u1), (w1, q)].
    inv1 = _complex_form(*_real_dft(p1, p1, t1)).transpose(3, 1, 0, 2).reshape(2 * t1, 2 * p1)
    inv1 = jnp.asarray(inv1, dtype)
    # Inverse real DFT along axis 2 (outputs u2 < T2) from the half spectrum.
    cos_i2, sin_i2 = _real_dft(p2, w2, t2)
    weight = _half_spectrum_weights(p2) / (p1 * p2)
    inv2 = np.stack([cos_i2, -sin_i2], 1) * weight[:, None, None]
    inv2 = jnp.asarray(inv2.reshape(2 * w2, t2), dtype)  # [(w2, d), u2]

    def chunk_fn(ker: jax.Array) -> jax.Array:
        bc = ker.shape[0]
        x = jnp.einsum("bijf,jwc->wcifb", ker, fwd_k2, precision=_HIGHEST)
        x = x.reshape(w2, 2 * k1, f * bc)
        x = jnp.matmul(jnp.broadcast_to(fwd_k1, (w2, *fwd_k1.shape)), x, precision=_HIGHEST)
        x = x.reshape(w2, p1, 2 * f, bc)  # X[w2, w1, (p, f), b]
        y = jnp.matmul(lhs, x, precision=_HIGHEST)  # [w2, w1, (q, blk), b]
        y = y.reshape(w2, 2 * p1, nblk * bc)
        z = jnp.matmul(jnp.broadcast_to(inv1, (w2, *inv1.shape)), y, precision=_HIGHEST)
        z = z.reshape(2 * w2, t1 * nblk * bc)  # [(w2, d), (u1, l, a, c, b)]
        out = jnp.matmul(z.T, inv2, precision=_HIGHEST)  # [(u1, l, a, c, b), u2]
        out = out.reshape(t1, lyr, nb1, nb2, bc, t2).transpose(4, 1, 2, 0, 3, 5)
        return out.reshape(bc, lyr, nb1 * t1, nb2 * t2)[:, :, :n1, :n2]

    spectrum = 2 * p1 * w2  # floats of one complex P1 x W2 spectrum
    per_example = 4 * (spectrum * (f + nblk) + 2 * w2 * t1 * nblk + 2 * t1 * t2 * nblk)
    chunk, n_chunks = _batch_chunk(b, per_example, plan.chunk_bytes)
    if plan.dft_2d_batch is not None and chunk > plan.dft_2d_batch:
        n_chunks = -(-b // plan.dft_2d_batch)
        chunk = -(-b // n_chunks)
    return _map_batch(chunk_fn, kernels, chunk, n_chunks, in_place, (maps,))


@functools.cache
def _dft_2d_route(plan: CorrelationPlan):
    """``"dft_2d"`` under ``plan`` as a ``(maps, kernels)`` function (see :func:`_bilinear`)."""
    return _bilinear(functools.partial(_dft_2d_impl, plan=plan))


def correlate_dft_2d(maps: jax.Array, kernels: jax.Array, plan: CorrelationPlan) -> jax.Array:
    """``"dft_2d"``: block DFTs along both axes (:func:`_dft_2d_impl`)."""
    return _dft_2d_route(plan)(maps, kernels)




def route_flops(
    route: str, maps_shape, kernels_shape, *, plan: CorrelationPlan | None = None
) -> float:
    """Flops of one correlation route for ``maps [L, N1, N2, F]`` and ``kernels [B, K1, K2, F]``
    (the benchmarks' roofline and ``"auto"``'s comparison of ``"direct"`` with ``"dft_rows"``;
    ``plan``, by default that of the default backend, fixes ``"dft_2d"``'s blocks). Map-side
    transforms are counted once; index/copy work is not counted."""
    lyr, n1, n2, f = maps_shape
    b, k1, k2, _ = kernels_shape
    if route == "direct":
        return 2.0 * b * lyr * n1 * n2 * k1 * k2 * f
    if route == "dft_rows":
        if k1 > k2:
            n1, n2, k1, k2 = n2, n1, k2, k1
        t = _dft_block(n2, k1, k2, f)
        nb = -(-n2 // t)
        p_len = t + k2 - 1
        w = p_len // 2 + 1
        rows = b * lyr * nb * n1
        products = 8.0 * w * k1 * f * rows  # [W] x [L nb N1, 2 K1 F] x [2 K1 F, 2 B]
        inverse = 4.0 * w * t * rows  # [2W, T] inverse DFT per output row block
        patch_dft = 8.0 * b * k1 * k2 * f * w
        maps_dft = 4.0 * lyr * (n1 + k1 - 1) * nb * p_len * f * w
        return products + inverse + patch_dft + maps_dft
    if route == "dft_2d":  # arithmetic only (the roofline); "auto" uses dft_2d_cost
        plan = plan_for() if plan is None else plan
        t1, t2 = _dft2_blocks(n1, n2, k1, k2, f, plan.float_cost)
        nb1, p1, _ = _dft_sizes(n1, k1, t1)
        nb2, p2, w2 = _dft_sizes(n2, k2, t2)
        transforms, products, _ = _dft2_work(n1, n2, k1, k2, f, t1, t2, lyr)
        maps_dft = 4.0 * lyr * nb1 * nb2 * f * p1 * w2 * (p2 + 2 * p1)
        return float(b * (transforms + products) + maps_dft)
    if route == "fft":
        m1, _ = _fft_length(n1, k1)
        m2, _ = _fft_length(n2, k2)
        logm = math.log2(m1 * m2)
        return (b * f + lyr * f + b * lyr) * m1 * m2 * logm * 2.5 + 4.0 * b * lyr * f * m1 * m2
    raise ValueError(f"route: expected one of {ROUTES}, got {route!r}")


def dft_2d_cost(maps_shape, kernels_shape, plan: CorrelationPlan) -> float:
    """Modelled cost of ``"dft_2d"`` in flops (arithmetic plus ``plan.float_cost`` per float
    moved, at its best blocks): what ``"auto"`` weighs against ``"dft_rows"``'s flops."""
    lyr, n1, n2, f = maps_shape
    b, k1, k2, _ = kernels_shape
    blocks = _dft2_blocks(n1, n2, k1, k2, f, plan.float_cost)
    return b * lyr * _dft2_cost(n1, n2, k1, k2, f, *blocks, plan.float_cost)
