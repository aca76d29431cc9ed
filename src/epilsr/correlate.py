"""Wrap-around (circular) correlation of patch batches with epitome-sized maps, and box sums.

The patch-dependent part of ``log p(x|s)`` (paper Eq. 5) is a sum of circular correlations

    out[b, l, s1, s2] = sum_{i, j, f} maps[l, (s1 + i) % N1, (s2 + j) % N2, f] * kernels[b, i, j, f]

computed by one of four routes behind :func:`circular_correlate`:

* ``"direct"``: wrap-pad the maps by ``K - 1`` and run one ``lax.conv`` whose output channels
  are the patches (``O(B L N^2 K^2 F)``, excellent for small ``K``);
* ``"hybrid"``: block DFTs (as matrix products) along one axis, direct sums over the ``K1`` row
  offsets along the other (moderate ``K``);
* ``"dft"``: block DFTs along both axes, all of them matrix products, and one small product
  per frequency summing the ``F`` channels (large ``K``);
* ``"fft"``: wrap-pad the maps to ``N + K - 1``, zero-pad both sides to a smooth FFT length
  ``M >= N + K - 1`` (prime ``N`` such as 299 or 499 never hits a slow transform), multiply
  in the frequency domain, sum over the ``F`` feature channels *before* the single inverse
  transform per (patch, layer) (``O((B + L) F M^2 log M + B L F M^2)``).

``"auto"`` picks by a cost model calibrated on CPU. On the CPU the two block-DFT routes work in
pieces (column groups, chunks of 16 patches) small enough that glibc reuses their memory between
calls instead of mapping fresh, page-faulting memory each time; values are written in place,
derivatives go through the stacked variant (a custom JVP: both routes are bilinear). The
adjoint (spreading values from positions back over their windows, used by the embeddings of
Eqs. 6 and 11) is obtained as the exact VJP of the correlation, so both stay consistent by
construction.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

__all__ = [
    "circular_correlate",
    "circular_correlate_adjoint",
    "box_sum",
    "box_spread",
    "fft_size",
    "wrap_pad",
]

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


def _correlate_direct(maps: jax.Array, kernels: jax.Array) -> jax.Array:
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


def _fft_plan(n: int, k: int) -> tuple[int, bool]:
    """FFT length along one axis and whether the maps need wrap-padding first."""
    padded = fft_size(n + k - 1)
    if fft_size(n) == n and n <= padded:
        return n, False  # n is already smooth: a plain circular transform of length n
    return padded, True


def _correlate_fft(maps: jax.Array, kernels: jax.Array) -> jax.Array:
    _, n1, n2, _ = maps.shape
    _, k1, k2, _ = kernels.shape
    m1, pad1 = _fft_plan(n1, k1)
    m2, pad2 = _fft_plan(n2, k2)
    if pad1 or pad2:
        maps = wrap_pad(maps, (1, 2), (n1 + k1 - 1 if pad1 else n1, n2 + k2 - 1 if pad2 else n2))
    # Channel-first so the transforms run over the trailing axes.
    a = jnp.fft.rfft2(jnp.moveaxis(maps, -1, 1), s=(m1, m2))  # [L, F, M1, M2r]
    p = jnp.fft.rfft2(jnp.moveaxis(kernels, -1, 1), s=(m1, m2))  # [B, F, M1, M2r]
    prod = jnp.einsum("lfxy,bfxy->blxy", a, jnp.conj(p), precision=_HIGHEST)
    out = jnp.fft.irfft2(prod, s=(m1, m2))
    return out[..., :n1, :n2]


# Intermediates of the batch-dependent part are kept under this many bytes per batch chunk.
_CHUNK_BYTES = 1 << 28


def _batch_chunk(batch: int, per_example_bytes: int) -> tuple[int, int]:
    """``(chunk, n_chunks)``: equal chunks of the batch, each under :data:`_CHUNK_BYTES`."""
    chunk = max(1, min(batch, _CHUNK_BYTES // max(per_example_bytes, 1)))
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
    mode transposes without carrying the whole output through a scan (N=299 B=256 K=21, maps
    gradient of the 2-D block route: 438 ms through the in-place scan, 170 ms this way)."""

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


def _dft_block(n2: int, k1: int, k2: int, f: int) -> int:
    """Output block ``T`` along axis 2 of the hybrid route: fewest multiply-adds per position.

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


# Temporaries per column group of the hybrid route. glibc serves allocations above 32 MiB with
# fresh mmaps whose pages fault on first touch at every call (~1 us per 4 KiB page on the
# benchmark CPU); groups this small are reused from the heap instead.
_GROUP_BYTES = 24 << 20


# Patches per batch chunk of the 2-D block route on CPU: its per-frequency products run best
# with ~16 patch columns, and the chunk's temporaries then stay small (N=299 B=64 K=21/31:
# 75/95 -> 57/86 ms; N=499 B=256 K=31: 761 -> 705 ms).
_DFT_CPU_CHUNK = 16


def _on_cpu() -> bool:
    """Whether computations run on the CPU (the small-chunk rules are CPU-specific: on an
    accelerator a scan over chunks only serialises work)."""
    return jax.default_backend() == "cpu"


def _hybrid_group(
    lyr: int, n1: int, k1: int, f: int, b: int, t: int, w: int, nb: int, itemsize: int = 4
) -> int:
    """Output blocks per column group of :func:`_correlate_hybrid`: the most whose largest
    temporaries (the spectra at the ``K1`` row offsets, the per-frequency products and the
    inverse, for ``b`` patches) fit in :data:`_GROUP_BYTES`; at least 1, at most ``nb``
    (always ``nb`` off the CPU)."""
    if not _on_cpu():
        return nb
    per_block = itemsize * lyr * n1 * (2 * w * f * k1 + 2 * w * b + t * b)
    return max(1, min(nb, _GROUP_BYTES // per_block))


def _hybrid_impl(maps: jax.Array, kernels: jax.Array, in_place: bool) -> jax.Array:
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
    With ``in_place``, blocks are processed in column groups of :func:`_hybrid_group` blocks (a
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
    chunk, n_chunks = _batch_chunk(b, per_example)
    out_dtype = jnp.result_type(dtype, kernels.dtype)
    g = _hybrid_group(lyr, n1, k1, f, chunk, t, w, nb, out_dtype.itemsize) if in_place else nb
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


_correlate_hybrid = _bilinear(_hybrid_impl)


def _hybrid_swapped(maps: jax.Array, kernels: jax.Array) -> jax.Array:
    """:func:`_correlate_hybrid` with the direct products along the axis of the shorter side."""
    if kernels.shape[1] <= kernels.shape[2]:
        return _correlate_hybrid(maps, kernels)
    out = _correlate_hybrid(jnp.swapaxes(maps, 1, 2), jnp.swapaxes(kernels, 1, 2))
    return jnp.swapaxes(out, 2, 3)


def _dft_sizes(n: int, k: int, t: int) -> tuple[int, int, int]:
    """``(blocks, P, W)`` of the 2-D block route along one axis with output blocks of ``t``."""
    p_len = t + k - 1
    return -(-n // t), p_len, p_len // 2 + 1


# Cost of one float through memory in flops of matrix products, fitted on CPU (2-core x86,
# benchmarks/posterior.py shapes): the 2-D block route is bound by its passes over memory.
_FLOAT_COST = 384


def _dft2_work(n1, n2, k1, k2, f, t1, t2, lyr=1) -> tuple[int, int, int]:
    """Per-patch ``(transform flops, per-frequency product flops, floats)`` of
    :func:`_correlate_dft` with ``lyr`` layers: the patch DFT and the two inverse products;
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


def _dft2_cost(n1: int, n2: int, k1: int, k2: int, f: int, t1: int, t2: int) -> float:
    """Modelled per-patch cost of :func:`_correlate_dft` (one layer) in flops: its arithmetic,
    the per-frequency products counted twice (tiny products run at about half the rate of the
    others; fitted), plus :data:`_FLOAT_COST` per float moved (:func:`_dft2_work`)."""
    transforms, products, floats = _dft2_work(n1, n2, k1, k2, f, t1, t2)
    return float(transforms + 2 * products + _FLOAT_COST * floats)


def _block_candidates(n: int) -> list[int]:
    """Output block lengths worth trying along an axis: the smallest per block count."""
    return [t for t in range(1, n + 1) if t == 1 or -(-n // (t - 1)) != -(-n // t)]


@functools.cache
def _dft2_blocks(n1: int, n2: int, k1: int, k2: int, f: int) -> tuple[int, int]:
    """Output blocks ``(T1, T2)`` of :func:`_correlate_dft` with the least modelled cost."""
    best, best_cost = (n1, n2), math.inf
    for t1 in _block_candidates(n1):
        for t2 in _block_candidates(n2):
            cost = _dft2_cost(n1, n2, k1, k2, f, t1, t2)
            if cost < best_cost:
                best, best_cost = (t1, t2), cost
    return best


def _dft_impl(maps: jax.Array, kernels: jax.Array, in_place: bool) -> jax.Array:
    """Block DFTs along both spatial axes, every transform and product a matrix product.

    The outputs are cut into ``nb1 x nb2`` blocks of ``T1 x T2``; block ``(a, c)`` needs the
    wrap-padded map segment of ``P1 x P2 = (T1 + K1 - 1) x (T2 + K2 - 1)``, on which the
    correlation is circular without aliasing. With the segments' 2-D DFTs ``A`` (once per
    call; real DFT along axis 2, ``W2 = P2//2 + 1`` frequencies) and the patches' ``X`` (a DFT
    of the ``K1 x K2`` non-zero entries), each frequency needs ``sum_f A conj(X)``: one small
    real product ``[2 L nb1 nb2, 2F] x [2F, B]`` per frequency. Two matrix products invert the
    transforms (axis 1, complex, outputs ``< T1``; axis 2, real, outputs ``< T2``). Unlike the
    hybrid route the size of each per-frequency product no longer grows with ``K1`` (no direct
    sum over row offsets), which wins for large patches; :func:`_dft2_blocks` picks the blocks.
    Patches go in batch chunks (of :data:`_DFT_CPU_CHUNK` on the CPU), written in place for
    values and stacked for derivatives (``in_place``, see :func:`_bilinear`).
    """
    lyr, n1, n2, f = maps.shape
    b, k1, k2, _ = kernels.shape
    t1, t2 = _dft2_blocks(n1, n2, k1, k2, f)
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
    chunk, n_chunks = _batch_chunk(b, per_example)
    if _on_cpu() and chunk > _DFT_CPU_CHUNK:
        n_chunks = -(-b // _DFT_CPU_CHUNK)
        chunk = -(-b // n_chunks)
    return _map_batch(chunk_fn, kernels, chunk, n_chunks, in_place, (maps,))


_correlate_dft = _bilinear(_dft_impl)


def route_flops(route: str, maps_shape, kernels_shape) -> float:
    """Flops of one correlation route (the benchmarks' roofline; ``"auto"`` compares the direct
    and hybrid counts, and :func:`_dft2_cost` for the 2-D block route). Map-side transforms are
    counted once; index/copy work is not counted."""
    lyr, n1, n2, f = maps_shape
    b, k1, k2, _ = kernels_shape
    if route == "direct":
        return 2.0 * b * lyr * n1 * n2 * k1 * k2 * f
    if route == "hybrid":
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
    if route == "dft":  # arithmetic only (the roofline); "auto" uses _dft2_cost
        t1, t2 = _dft2_blocks(n1, n2, k1, k2, f)
        nb1, p1, _ = _dft_sizes(n1, k1, t1)
        nb2, p2, w2 = _dft_sizes(n2, k2, t2)
        transforms, products, _ = _dft2_work(n1, n2, k1, k2, f, t1, t2, lyr)
        maps_dft = 4.0 * lyr * nb1 * nb2 * f * p1 * w2 * (p2 + 2 * p1)
        return float(b * (transforms + products) + maps_dft)
    if route == "fft":
        m1, _ = _fft_plan(n1, k1)
        m2, _ = _fft_plan(n2, k2)
        logm = math.log2(m1 * m2)
        return (b * f + lyr * f + b * lyr) * m1 * m2 * logm * 2.5 + 4.0 * b * lyr * f * m1 * m2
    raise ValueError(f"route: expected 'direct', 'hybrid', 'dft' or 'fft', got {route!r}")


# The hybrid route runs at ~1/4 (maps under 256^2) or ~1/5 (larger maps) of the rate the 2-D
# block route's cost model assumes for products (its per-frequency products are strided, its
# row-offset gather is memory-bound). Refitted after both routes got their CPU chunking, on
# the grid of `python -m benchmarks.correlate_crossover` (N = 128 / 299 / 499, B = 32 / 64 / 256,
# K = 3-21): at N = 128 the hybrid route wins to K ~ 11 (B=64 K=11 5.6 vs 7.7 ms) and the 2-D
# route from K ~ 15 at B = 256 (46 vs 35 ms); at N >= 299 the 2-D route wins from K = 11 (B=32
# 28 vs 18 ms, B=256 180 vs 134 ms; N=499 B=256 552 vs 405 ms). "auto" picks the fastest
# route in 30 of 39 shapes, 4 % slower than the fastest on average, 51 % at worst (N=299 B=32
# K=7, where the hybrid route takes 21 ms and the 2-D one 14 ms).
_HYBRID_COST = 4.0
_HYBRID_COST_LARGE = 5.0  # maps of at least 256^2 positions


def _auto_method(maps_shape, kernels_shape) -> str:
    """The route ``"auto"`` takes: ``"direct"`` while it does fewer than 1.5x the hybrid route's
    flops (tiny patches; XLA's convolution runs below its matrix-multiply rate), else
    ``"dft"`` where its modelled cost (:func:`_dft2_cost`) is below ``_HYBRID_COST`` (maps
    under 256^2) or ``_HYBRID_COST_LARGE`` times the hybrid flops (larger patches), else
    ``"hybrid"``. Calibrated on a 2-core x86 CPU with
    ``benchmarks/posterior.py``."""
    direct = route_flops("direct", maps_shape, kernels_shape)
    hybrid = route_flops("hybrid", maps_shape, kernels_shape)
    if direct <= 1.5 * hybrid:
        return "direct"
    lyr, n1, n2, f = maps_shape
    b, k1, k2, _ = kernels_shape
    dft = b * lyr * _dft2_cost(n1, n2, k1, k2, f, *_dft2_blocks(n1, n2, k1, k2, f))
    ratio = _HYBRID_COST_LARGE if n1 * n2 >= 256 * 256 else _HYBRID_COST
    return "dft" if dft < ratio * hybrid else "hybrid"


def circular_correlate(maps: jax.Array, kernels: jax.Array, *, method: str = "auto") -> jax.Array:
    """Circular correlation of every kernel with every map layer.

    Args:
      maps: ``[L, N1, N2, F]`` epitome-side maps.
      kernels: ``[B, K1, K2, F]`` patch-side kernels, ``K1 <= N1``, ``K2 <= N2``.
      method: ``"auto"``, ``"direct"``, ``"hybrid"``, ``"dft"`` or ``"fft"``.

    Returns:
      ``[B, L, N1, N2]`` with
      ``out[b, l, s] = sum_{u, f} maps[l, (s + u) % N, f] kernels[b, u, f]``.
    """
    if maps.ndim != 4 or kernels.ndim != 4 or maps.shape[-1] != kernels.shape[-1]:
        raise ValueError(
            f"circular_correlate: expected maps [L, N1, N2, F] and kernels [B, K1, K2, F], "
            f"got {maps.shape} and {kernels.shape}"
        )
    if kernels.shape[1] > maps.shape[1] or kernels.shape[2] > maps.shape[2]:
        raise ValueError(
            f"patch size {kernels.shape[1:3]} is larger than the epitome {maps.shape[1:3]}"
        )
    if method == "auto":
        method = _auto_method(maps.shape, kernels.shape)
    if method == "direct":
        return _correlate_direct(maps, kernels)
    if method == "hybrid":
        return _hybrid_swapped(maps, kernels)
    if method == "dft":
        return _correlate_dft(maps, kernels)
    if method == "fft":
        return _correlate_fft(maps, kernels)
    raise ValueError(f"method: expected 'auto', 'direct', 'hybrid', 'dft' or 'fft', got {method!r}")


def circular_correlate_adjoint(
    weights: jax.Array, kernels: jax.Array, *, map_size: tuple[int, int], method: str = "auto"
) -> jax.Array:
    """Adjoint of :func:`circular_correlate` in ``maps``: spreads position weights over windows.

    ``out[l, m, f] = sum_b sum_u weights[b, l, (m - u) % N] * kernels[b, u, f]``.

    Args:
      weights: ``[B, L, N1, N2]`` (e.g. posteriors).
      kernels: ``[B, K1, K2, F]`` (e.g. label blocks placed in their windows).
      map_size: ``(N1, N2)``.
      method: as for :func:`circular_correlate`.

    Returns:
      ``[L, N1, N2, F]``.
    """
    b, lyr = weights.shape[:2]
    zeros = jnp.zeros((lyr, *map_size, kernels.shape[-1]), weights.dtype)
    _, vjp = jax.vjp(lambda m: circular_correlate(m, kernels, method=method), zeros)
    return vjp(weights)[0]


def _box_1d(x: jax.Array, k: int, axis: int, reverse: bool) -> jax.Array:
    n = x.shape[axis]
    start = -(k - 1) if reverse else 0
    idx = (jnp.arange(n + k - 1) + start) % n
    padded = jnp.take(x, idx, axis=axis)
    window = [1] * x.ndim
    window[axis] = k
    return lax.reduce_window(
        padded, np.zeros((), x.dtype), lax.add, tuple(window), (1,) * x.ndim, "VALID"
    )


def box_sum(x: jax.Array, size: tuple[int, int], *, axes: tuple[int, int] = (-2, -1)) -> jax.Array:
    """Circular box sum over windows by their top-left corner.

    ``out[s1, s2] = sum_{i < K1, j < K2} x[(s1 + i) % N1, (s2 + j) % N2]`` along ``axes``.
    Separable (``O(N^2 (K1 + K2))``) and summed directly, so float32 stays accurate.
    """
    a1, a2 = (ax % x.ndim for ax in axes)
    return _box_1d(_box_1d(x, size[0], a1, False), size[1], a2, False)


def box_spread(
    x: jax.Array, size: tuple[int, int], *, axes: tuple[int, int] = (-2, -1)
) -> jax.Array:
    """Adjoint of :func:`box_sum`: every position's value spread over its window.

    ``out[m, n] = sum_{i < K1, j < K2} x[(m - i) % N1, (n - j) % N2]`` (Eq. 11's spreading).
    """
    a1, a2 = (ax % x.ndim for ax in axes)
    return _box_1d(_box_1d(x, size[0], a1, True), size[1], a2, True)
