"""Self-epitomic LSR (Sec. 5.1): each tile is its own epitome; sampled-patch counts, Eqs. 7-9."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from epilsr._validate import (
    check_class_prior,
    check_distribution_table,
    check_index_range,
    check_rank,
    is_concrete,
)
from epilsr.correlate import (
    CorrelationPlan,
    box_spread,
    box_sum,
    circular_correlate,
    circular_correlate_adjoint,
    plan_for,
)
from epilsr.epitome import as_float_image, check_image
from epilsr.lsr import _adapt_compositions, _normalise

__all__ = [
    "self_epitomic_counts",
    "self_epitomic_lsr",
]


def _block_mean(image: jax.Array, factor: int) -> jax.Array:
    """``[H, W, C] -> [ceil(H/f), ceil(W/f), C]`` block means (edge-padded)."""
    if factor == 1:
        return image
    h, w, c = image.shape
    hp, wp = -(-h // factor) * factor, -(-w // factor) * factor
    image = jnp.pad(image, ((0, hp - h), (0, wp - w), (0, 0)), mode="edge")
    return image.reshape(hp // factor, factor, wp // factor, factor, c).mean(axis=(1, 3))


def _window_mask(size: tuple[int, int], k: int, wrap: bool) -> jax.Array:
    """``[N1, N2]`` bool: windows that lie inside the image (all of them when ``wrap``)."""
    n1, n2 = size
    if wrap:
        return jnp.ones((n1, n2), bool)
    return (jnp.arange(n1)[:, None] <= n1 - k) & (jnp.arange(n2)[None, :] <= n2 - k)


@functools.partial(
    jax.jit,
    static_argnames=(
        "n_classes",
        "patch_size",
        "downsample",
        "n_patches",
        "chunk",
        "wrap",
        "class_spread",
        "unfold",
        "plan",
        "rank",
        "position_stride",
    ),
)
def _self_counts(
    key,
    image,
    classes,
    var,
    temperature,
    *,
    n_classes,
    patch_size,
    downsample,
    n_patches,
    chunk,
    wrap,
    class_spread,
    unfold,
    plan,
    rank=None,
    position_stride=1,
):
    """Eq. 11 class counts ``[n1, n2, Cc]`` of one tile whose downsampled self is the epitome:
    the patches drawn (:func:`_sample_windows`), then the route the arguments pick (approximate,
    unfolded windows, or correlations)."""
    k = patch_size
    epi, cls = _low_res_tile(image, classes, downsample)
    n1, n2, _ = epi.shape
    picks, rows, weights, total = _sample_windows(key, (n1, n2), k, n_patches, chunk, wrap)
    scale = 1.0 / (var * temperature)
    # Class of the window at each corner: its centre pixel (Eq. 11 spreads it over the window).
    centre = (
        jnp.minimum(jnp.arange(n1) + k // 2, n1 - 1)[:, None] * n2
        + jnp.minimum(jnp.arange(n2) + k // 2, n2 - 1)[None, :]
    ).ravel()

    if rank is not None or position_stride > 1:
        return _approx_counts(epi, cls, picks, rows, weights, centre, scale, k=k, wrap=wrap,
                              n_classes=n_classes, rank=rank, stride=position_stride,
                              total=total, plan=plan)
    if unfold:
        return _unfolded_counts(epi, cls, picks, rows, weights, centre, scale, k=k, wrap=wrap,
                                n_classes=n_classes)
    return _correlated_counts(epi, cls, picks, rows, weights, centre, scale, k=k, wrap=wrap,
                              n_classes=n_classes, class_spread=class_spread, plan=plan)


def _low_res_tile(image, classes, d: int):
    """``(epitome [h, w, C], classes [h, w])`` of a tile downsampled by ``d``: block means,
    and the full-resolution class at the centre of each block."""
    h, w, _ = image.shape
    epi = _block_mean(image, d)
    n1, n2, _ = epi.shape
    rows = jnp.minimum(jnp.arange(n1) * d + d // 2, h - 1)
    cols = jnp.minimum(jnp.arange(n2) * d + d // 2, w - 1)
    return epi, classes[rows][:, cols]


def _sample_windows(key, size, k: int, n_patches, chunk: int, wrap: bool):
    """The patches of Eq. 11 in chunks: ``(picks, rows, weights)``, each ``[n_chunks, chunk]``
    (top-left corners flat over ``[n1, n2]``; rows of the unfolded epitome; 1, or 0 for
    padding), and the number of patches. ``n_patches=None``: every inside window once; else
    that many drawn uniformly with ``key``."""
    n1, n2 = size
    inside = _window_mask((n1, n2), k, False)  # patches are real (non-wrapping) windows
    flat_valid = jnp.flatnonzero(inside.ravel(), size=inside.size, fill_value=0)
    n_valid = (n1 - k + 1) * (n2 - k + 1)
    if n_patches is None:  # dense: every window of the tile once
        total = n_valid
        draws = jnp.arange(total)
    else:
        total = n_patches
        draws = jax.random.randint(key, (total,), 0, n_valid)
    picks = flat_valid[draws]  # [total] top-left corners, flat over [n1, n2]
    n_chunks = -(-total // chunk)
    pad = n_chunks * chunk - total
    weights = jnp.pad(jnp.ones((total,), jnp.float32), (0, pad)).reshape(n_chunks, chunk)
    # Window rows of the unfolded epitome: inside windows in row-major order (= the draws), or
    # every position of the wrap-padded tile (= the flat corner).
    rows = picks if wrap else draws
    picks = jnp.pad(picks, (0, pad)).reshape(n_chunks, chunk)
    rows = jnp.pad(rows, (0, pad)).reshape(n_chunks, chunk)
    return picks, rows, weights, total


def _correlated_counts(epi, cls, picks, rows, weights, centre, scale, *, k, wrap, n_classes,
                       class_spread, plan):
    """Eq. 11 counts through correlations (pixel class spreading, or tiles too large to
    unfold): per chunk the posteriors over every position, then the classes of the windows
    (``"window"``) or of their pixels (``"pixel"``, Eq. 6 on classes). ``[n1, n2, Cc]``."""
    n1, n2, _ = epi.shape
    valid = _window_mask((n1, n2), k, wrap)  # positions patches may map to
    maps = epi[None]  # [1, h, w, C]
    half_norm = 0.5 * box_sum(jnp.sum(epi * epi, axis=-1), (k, k))  # [h, w]
    cls_onehot = jax.nn.one_hot(cls, n_classes, dtype=jnp.float32)  # [h, w, Cc]

    def extract(p):
        r, c = p // n2, p % n2
        return jax.lax.dynamic_slice(epi, (r, c, 0), (k, k, epi.shape[-1]))

    def body(acc, xs):
        pos, _, wt = xs
        patches = jax.vmap(extract)(pos)  # [chunk, K, K, C]
        logits = (circular_correlate(maps, patches, plan=plan)[:, 0] - half_norm) * scale
        logits = jnp.where(valid, logits, -jnp.inf)
        post = jax.nn.softmax(logits, axis=(1, 2)) * wt[:, None, None]  # [chunk, h, w]
        if class_spread == "window":
            onehot = jax.nn.one_hot(cls.ravel()[centre[pos]], n_classes, dtype=jnp.float32)
            acc = acc + jnp.einsum("bc,bxy->xyc", onehot, post, precision="highest")
        else:  # "pixel": each pixel's own class lands where the pixel maps (Eq. 6 on classes)
            blocks = jax.vmap(
                lambda p: jax.lax.dynamic_slice(cls_onehot, (p // n2, p % n2, 0), (k, k, n_classes))
            )(pos)
            acc = acc + circular_correlate_adjoint(
                post[:, None], blocks, map_size=(n1, n2), plan=plan
            )[0]
        return acc, None

    acc0 = jnp.zeros((n1, n2, n_classes), jnp.float32)
    acc, _ = jax.lax.scan(body, acc0, (picks, rows, weights))
    if class_spread == "window":
        return box_spread(acc, (k, k), axes=(0, 1))
    return acc


def _unfolded_counts(epi, cls, picks, rows, weights, centre, scale, *, k, wrap, n_classes):
    """Eq. 11 counts of the exact route on unfolded windows (``class_spread="window"``): the
    posteriors of each chunk of patches in one matrix product. ``[n1, n2, Cc]``."""
    n1, n2, _ = epi.shape
    # Equal variances and a flat prior: log p(x|s)/T = (<mu_s, x> - |mu_s|^2/2)/(var T) + c(x),
    # and with the windows unfolded into rows U [S, K*K*C] the cross terms of a chunk of
    # patches (themselves rows of U) are one matrix product [chunk, F] x [F, S].
    windows, (m1, m2) = _unfold(epi, k, wrap)  # [S, F]
    half_norm = 0.5 * jnp.sum(windows * windows, axis=-1)  # [S]

    def gemm_body(acc, xs):
        pos, row, wt = xs
        cross = jnp.matmul(windows[row], windows.T, precision="highest")  # [chunk, S]
        # Each patch is itself a window, so its largest logit is its own: -|x - mu_s|^2/2
        # <= 0 with equality at s = row. Subtracting |x|^2/2 is the softmax's max shift
        # without a pass over S, and the normalisation folds into the embedding weights.
        rel = jnp.exp((cross - half_norm - half_norm[row][:, None]) * scale)  # (0, 1]
        onehot = jax.nn.one_hot(cls.ravel()[centre[pos]], n_classes, dtype=jnp.float32)
        coef = onehot * (wt / jnp.sum(rel, axis=1))[:, None]  # [chunk, Cc]
        return acc + jnp.matmul(coef.T, rel, precision="highest"), None  # [Cc, S]

    acc0 = jnp.zeros((n_classes, m1 * m2), jnp.float32)
    acc, _ = jax.lax.scan(gemm_body, acc0, (picks, rows, weights))
    acc = acc.T.reshape(m1, m2, n_classes)
    acc = jnp.pad(acc, ((0, n1 - m1), (0, n2 - m2), (0, 0)))
    return box_spread(acc, (k, k), axes=(0, 1))


def _pca_basis(vectors: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """``[n, F]`` patch vectors -> their mean ``[F]`` and the top-``rank`` principal directions
    ``U [F, rank]`` (orthonormal columns; eigenvectors of the ``[F, F]`` covariance)."""
    mean = jnp.mean(vectors, axis=0)
    centred = vectors - mean
    cov = jnp.matmul(centred.T, centred, precision="highest") / vectors.shape[0]
    _, vecs = jnp.linalg.eigh(cov)  # ascending eigenvalues
    return mean, vecs[:, ::-1][:, :rank]


def _grid_windows(epi: jax.Array, k: int, wrap: bool, stride: int, mean: jax.Array,
                  basis: jax.Array | None, max_bytes: int):
    """The windows ``y`` whose top-left corners lie on the stride-``g`` grid (of the inside
    windows, or of the torus with ``wrap``), centred and projected: ``Z = (y - mean) U``
    ``[S', r]`` (``U = basis``; ``None``: ``y - mean`` itself) and the exact half norms
    ``|y - mean|^2 / 2`` ``[S']``, ``S' = ceil(m1 / g) ceil(m2 / g)`` row-major. The unfolded
    windows exist one block of grid rows at a time (at most ``max_bytes``), so a projection
    needs ``O(S' r)`` memory, not ``O(S' F)``. Also returns ``(m1, m2)``, the corners' grid."""
    if wrap:
        epi = jnp.pad(epi, ((0, k - 1), (0, k - 1), (0, 0)), mode="wrap")
    n1, n2, c = epi.shape
    m1, m2 = n1 - k + 1, n2 - k + 1
    g1, g2 = -(-m1 // stride), -(-m2 // stride)
    block = max(1, min(g1, max_bytes // max(1, 4 * g2 * k * k * c)))
    n_blocks = -(-g1 // block)
    height = (block - 1) * stride + k
    padded = jnp.pad(epi, ((0, max(0, (n_blocks * block - 1) * stride + k - n1)), (0, 0), (0, 0)))

    def one(start):
        strip = jax.lax.dynamic_slice(padded, (start * stride, 0, 0), (height, n2, c))
        shifted = [strip[i : i + (block - 1) * stride + 1 : stride,
                         j : j + (g2 - 1) * stride + 1 : stride]
                   for i in range(k) for j in range(k)]
        centred = jnp.stack(shifted, axis=2).reshape(block * g2, -1) - mean  # [block g2, F]
        z = centred if basis is None else jnp.matmul(centred, basis, precision="highest")
        return z, 0.5 * jnp.sum(centred * centred, axis=-1)

    z, half = jax.lax.map(one, jnp.arange(n_blocks) * block)
    z = z.reshape(n_blocks * block * g2, -1)[: g1 * g2]
    return z, half.reshape(-1)[: g1 * g2], (m1, m2)


# Posteriors per batch of the approximate route: [chunk, S'] floats. Its product is cheap
# (rank r << K^2 C), so the exponentials and sums set the pace and want the block in cache
# (measured on the 2-core CPU, full resolution, rank 16: chunks of 16-32 patches 1.5x faster
# than 256).
_APPROX_BATCH_FLOATS = 1 << 20
_EXP_SHIFT = 60.0  # exp(60) * 2^32 positions stays below float32's max


def _shifted_exp(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``exp(logits - shift)`` ``[chunk, S]`` and its row sums ``[chunk]`` for logits ``<= 0``.

    The approximate logits are ``-(|U^T(x' - y')|^2 + |r_x|^2 + |r_y|^2) / 2 <= 0`` (scaled),
    but neither the patch itself (``rank``) nor a position at ``0`` (``stride``) bounds their
    maximum from below, so the exact route's shift-free softmax does not apply. A constant
    shift of ``-60`` cannot overflow and costs no pass over ``S``; chunks where some row still
    sums to zero (every logit below about ``-147``) are redone with the rows' maxima."""
    rel = jnp.exp(logits + _EXP_SHIFT)
    total = jnp.sum(rel, axis=1)

    def exact(_):
        r = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
        return r, jnp.sum(r, axis=1)

    return jax.lax.cond(jnp.all(total > 0), lambda _: (rel, total), exact, None)


def _block_cells(m: int, g: int) -> np.ndarray:
    """``[ceil(m / g)]`` positions of ``0..m-1`` each stride-``g`` sample stands for."""
    return np.minimum(g, m - g * np.arange(-(-m // g))).astype(np.float32)


def _approx_counts(epi, cls, picks, rows, weights, centre, scale, *, k, wrap, n_classes, rank,
                   stride, total, plan):
    """Eq. 11 counts with an approximate posterior (``[n1, n2, Cc]``, the exact route's layout).

    * ``rank``: ``|x - y|^2 = |x'|^2 + |y'|^2 - 2 x'.y'`` (``x' = x - m``, ``m`` the patches'
      mean) with the norms exact and the cross term ``x'.y'`` replaced by ``(U^T x').(U^T y')``,
      ``U [F, r]`` the top-``r`` principal directions of the sampled patches (at most 4096 of
      them). The error of each cross term is ``|r_x . r_y| <= |r_x| |r_y|`` with ``r = (I -
      U U^T) x'`` the residual off the subspace, so the logits move by at most ``|r_x| |r_y| /
      (var T)``; ``r = F`` is exact up to rounding. The product is ``[P, r] x [r, S]``.
    * ``stride`` ``g``: the posterior of each patch is over the positions on a stride-``g``
      grid of corners (``S / g^2`` exponentials), each standing for the ``g x g`` block of
      corners it starts; its mass is shared evenly over that block (clipped at the border)
      before the ``K x K`` class spreading, so every patch still spreads one unit.
    """
    n1, n2, c = epi.shape
    f = k * k * c

    def extract(p):  # [chunk] top-left corners -> [chunk, F] patch vectors
        return jax.vmap(lambda q: jax.lax.dynamic_slice(epi, (q // n2, q % n2, 0), (k, k, c)))(
            p).reshape(p.shape[0], f)

    vectors = extract(picks.ravel()[:total][:: max(1, total // 4096)][:4096])  # for the PCA
    if rank is None:  # the exact cross term (only the positions subsampled)
        mean, basis = jnp.mean(vectors, axis=0), None
    else:
        mean, basis = _pca_basis(vectors, rank)
    zs, hs, (m1, m2) = _grid_windows(epi, k, wrap, stride, mean, basis, plan.unfold_bytes)
    g = stride
    cells = np.outer(_block_cells(m1, g), _block_cells(m2, g)).ravel()

    def body(acc, xs):
        pos, _, wt = xs
        x = extract(pos) - mean  # [chunk, F] (the patch at corner pos)
        zx = x if basis is None else jnp.matmul(x, basis, precision="highest")
        logits = jnp.matmul(zx, zs.T, precision="highest") - hs - 0.5 * jnp.sum(x * x, -1)[:, None]
        rel, sums = _shifted_exp(logits * scale)  # [chunk, S'], [chunk]
        onehot = jax.nn.one_hot(cls.ravel()[centre[pos]], n_classes, dtype=jnp.float32)
        coef = onehot * (wt / sums)[:, None]
        return acc + jnp.matmul(coef.T, rel, precision="highest"), None  # [Cc, S']

    acc0 = jnp.zeros((n_classes, zs.shape[0]), jnp.float32)
    acc, _ = jax.lax.scan(body, acc0, (picks, rows, weights))
    acc = (acc / cells).T.reshape(-(-m1 // g), -(-m2 // g), n_classes)
    acc = jnp.repeat(jnp.repeat(acc, g, axis=0), g, axis=1)[:m1, :m2]  # share over each block
    acc = jnp.pad(acc, ((0, n1 - m1), (0, n2 - m2), (0, 0)))
    return box_spread(acc, (k, k), axes=(0, 1))


def _unfold_bytes(shape: tuple[int, ...], k: int, wrap: bool) -> int:
    n1, n2, c = shape
    m1, m2 = (n1, n2) if wrap else (n1 - k + 1, n2 - k + 1)
    return 4 * m1 * m2 * k * k * c


def _compaction(present: np.ndarray | None, n_classes: int):
    """Lookup ``[n_classes]`` int32 (class -> compact index) and ``[P]`` the table rows the
    compact classes stand for (the ``present`` ones, sorted), so the per-chunk class products
    have a row per present class (a tile has a few of the 22 NLCD classes). ``P`` is padded with
    repeats of the last present row to a bucket size (4, 8, 16, ...) so tiles share
    compilations; padded slots get no pixels. ``(None, None)`` without ``present`` (traced
    classes) or when the bucket would not be smaller than ``n_classes``."""
    if present is None:
        return None, None
    bucket = 4
    while bucket < present.size:
        bucket *= 2
    if bucket >= n_classes:
        return None, None
    lookup = np.zeros(n_classes, np.int32)
    lookup[present] = np.arange(present.size)
    padded = np.concatenate([present, np.full(bucket - present.size, present[-1])])
    return lookup, padded.astype(np.int32)


def _default_chunk(positions: int, unfold: bool, plan: CorrelationPlan) -> int:
    """Patches per posterior batch: ``[chunk, S]`` under ``plan.unfold_batch_floats`` and at
    most ``plan.unfold_batch_max`` patches on the matrix-product route (the product then runs
    near the machine's matmul rate), ``[chunk, h, w]`` under ``plan.correlate_batch_floats``
    and at most ``plan.correlate_batch_max`` on the correlation route."""
    if unfold:
        return max(1, min(plan.unfold_batch_max, plan.unfold_batch_floats // positions))
    return max(1, min(plan.correlate_batch_max, plan.correlate_batch_floats // positions))


def _balanced_chunk(total: int, chunk: int) -> int:
    """The smallest chunk that needs as many batches as ``chunk`` does (less zero padding)."""
    chunk = max(1, min(chunk, total))
    n_chunks = -(-total // chunk)
    return -(-total // n_chunks)


def _unfold(epi: jax.Array, k: int, wrap: bool) -> tuple[jax.Array, tuple[int, int]]:
    """``[N1, N2, C] -> [S, K*K*C]`` windows by top-left corner, row-major, features ``(i, j, c)``
    like ``patch.reshape(-1)``: the inside windows, or every position of the torus with ``wrap``."""
    if wrap:
        epi = jnp.pad(epi, ((0, k - 1), (0, k - 1), (0, 0)), mode="wrap")
    m1, m2 = epi.shape[0] - k + 1, epi.shape[1] - k + 1
    shifted = [epi[i : i + m1, j : j + m2] for i in range(k) for j in range(k)]
    return jnp.stack(shifted, axis=2).reshape(m1 * m2, -1), (m1, m2)


def _upsample(probs: jax.Array, factor: int, shape: tuple[int, int]) -> jax.Array:
    """``[h, w, n]`` low-resolution distributions -> ``[H, W, n]`` (bilinear, renormalised)."""
    if factor == 1:
        return probs
    n1, n2, n = probs.shape
    up = jax.image.resize(probs, (n1 * factor, n2 * factor, n), "linear")
    return _normalise(jnp.maximum(up[: shape[0], : shape[1]], 0.0), axis=-1)


def _check_sampling(image, classes, n_rows, patch_size, downsample, var, class_spread,
                    sample_fraction, chunk, rank=None, position_stride=1):
    """Shared argument checks of the self-epitomic functions (values only when concrete, on the
    host); returns the image and classes as arrays (not yet converted: that is compiled), the
    classes present (``None`` if traced) and the number of sampled patches."""
    image = check_image(image)
    classes = classes if isinstance(classes, np.ndarray | jax.Array) else np.asarray(classes)
    check_rank("classes", classes, 2, "[H, W]")
    if classes.shape != image.shape[:2]:
        raise ValueError(
            f"classes: expected shape {image.shape[:2]} to match image, got {classes.shape}"
        )
    check_index_range("classes", classes, n_rows, "class")
    present = None
    if is_concrete(classes):  # after the range check: a histogram, cheaper than np.unique
        present = np.flatnonzero(np.bincount(np.asarray(classes).ravel(), minlength=n_rows))
    if downsample < 1:
        raise ValueError(f"downsample: expected an integer >= 1, got {downsample}")
    n1, n2 = -(-image.shape[0] // downsample), -(-image.shape[1] // downsample)
    if patch_size < 1 or patch_size > min(n1, n2):
        raise ValueError(
            f"patch_size: expected 1 <= K <= {min(n1, n2)} (the downsampled tile is {n1}x{n2}), "
            f"got {patch_size}"
        )
    if not var > 0:
        raise ValueError(f"var: expected a positive variance, got {var}")
    if class_spread not in ("window", "pixel"):
        raise ValueError(f"class_spread: expected 'window' or 'pixel', got {class_spread!r}")
    if sample_fraction is None:
        n_patches = None
    else:
        if not sample_fraction > 0:
            raise ValueError(f"sample_fraction: expected > 0 or None, got {sample_fraction}")
        n_patches = max(1, round(sample_fraction * image.shape[0] * image.shape[1]))
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk: expected a positive number of patches, got {chunk}")
    _check_approx(rank, position_stride, patch_size**2 * image.shape[-1], class_spread)
    return image, classes, present, n_patches


def _check_approx(rank, position_stride, features: int, class_spread: str) -> None:
    """Values of the approximate posterior's keywords (``features = K^2 C``)."""
    if rank is not None and (
        isinstance(rank, bool) or not isinstance(rank, int | np.integer)
        or not 1 <= rank <= features
    ):
        raise ValueError(
            f"rank: expected None (exact) or an integer 1 <= rank <= K*K*C = {features}, "
            f"got {rank!r}"
        )
    if (isinstance(position_stride, bool) or not isinstance(position_stride, int | np.integer)
            or position_stride < 1):
        raise ValueError(f"position_stride: expected an integer >= 1, got {position_stride!r}")
    if (rank is not None or position_stride > 1) and class_spread != "window":
        raise ValueError(
            f"rank/position_stride: the approximate posterior needs class_spread='window', "
            f"got {class_spread!r}"
        )


def _counts_plan(image_shape, present, n_rows, n_patches, *, patch_size, var, downsample,
                 temperature, wrap, class_spread, chunk, plan, rank=None, position_stride=1):
    """Host-side choices of the counts' computation: ``(arrays, static)`` where ``arrays`` are
    the traced arguments of :func:`_full_counts` after ``key, image, classes`` and ``static``
    its static keyword arguments (route, chunk, compaction size)."""
    n1, n2 = -(-image_shape[0] // downsample), -(-image_shape[1] // downsample)
    temperature = float(patch_size**2) if temperature is None else temperature
    unfold = (
        class_spread == "window"
        and _unfold_bytes((n1, n2, image_shape[-1]), patch_size, wrap) <= plan.unfold_bytes
    )
    approx = rank is not None or position_stride > 1
    if chunk is None and approx:  # cheap products: keep [chunk, S'] in cache for the exps
        positions = -(-n1 // position_stride) * -(-n2 // position_stride)
        chunk = max(8, min(plan.unfold_batch_max, _APPROX_BATCH_FLOATS // positions))
    elif chunk is None:
        chunk = _default_chunk(n1 * n2, unfold, plan)
    total = (n1 - patch_size + 1) * (n2 - patch_size + 1) if n_patches is None else n_patches
    chunk = _balanced_chunk(total, chunk)
    lookup, rows = _compaction(present, n_rows)
    arrays = (lookup, rows, jnp.float32(var), jnp.float32(temperature))
    static = dict(
        n_rows=n_rows, patch_size=patch_size, downsample=downsample, n_patches=n_patches,
        chunk=chunk, wrap=wrap, class_spread=class_spread, unfold=unfold, plan=plan,
        rank=None if rank is None else int(rank), position_stride=int(position_stride),
    )
    return arrays, static


_COUNT_STATICS = (
    "n_rows", "patch_size", "downsample", "n_patches", "chunk", "wrap", "class_spread", "unfold",
    "plan", "rank", "position_stride",
)


def _compact_counts(key, image, classes, lookup, rows, var, temperature, *, n_rows, **static):
    """Eq. 11 counts of checked inputs on the compact classes: ``[h, w, P]`` with the classes
    renumbered by ``lookup`` (``P = rows.size``), or ``[h, w, n_rows]`` without compaction."""
    image = as_float_image(image)
    compact = classes.astype(jnp.int32) if lookup is None else lookup[classes]
    n_classes = n_rows if rows is None else rows.shape[0]
    return _self_counts(key, image, compact, var, temperature, n_classes=n_classes, **static)


def _scatter_rows(counts: jax.Array, rows: jax.Array | None, n_rows: int) -> jax.Array:
    """Compact counts ``[..., P]`` back to the table's ``rows`` (absent classes: zero)."""
    if rows is None:
        return counts
    full = jnp.zeros((*counts.shape[:-1], n_rows), counts.dtype)
    return full.at[..., rows].add(counts)


@functools.partial(jax.jit, static_argnames=_COUNT_STATICS)
def _full_counts(key, image, classes, lookup, rows, var, temperature, *, n_rows, **static):
    """Eq. 11 counts ``[h, w, n_rows]`` of checked inputs, compiled: the image converted, the
    classes renumbered to the compact ones (``lookup``), the counts scattered back to the
    table's ``rows`` (absent classes: zero counts)."""
    counts = _compact_counts(key, image, classes, lookup, rows, var, temperature, n_rows=n_rows,
                             **static)
    return _scatter_rows(counts, rows, n_rows)


def self_epitomic_counts(
    key: ArrayLike,
    image: ArrayLike,
    classes: ArrayLike,
    n_classes: int,
    *,
    patch_size: int = 7,
    var: float = 0.01,
    downsample: int = 1,
    sample_fraction: float | None = 0.05,
    temperature: float | None = None,
    wrap: bool = False,
    class_spread: str = "window",
    chunk: int | None = None,
    plan: CorrelationPlan | None = None,
    rank: int | None = None,
    position_stride: int = 1,
) -> jax.Array:
    """The class counts that self-epitomic LSR feeds to its EM (Eq. 11, the tile as epitome).

    The first half of :func:`self_epitomic_lsr`, for users who run their own EM or score a
    labelling with :func:`lsr_objective` (e.g. to ask whether the coarse data support a
    reference map at all). Arguments as there (``rank``/``position_stride``: the approximate
    posterior, off by default); runs jitted.

    Returns:
      ``[h, w, n_classes]`` non-negative counts on the ``downsample``-times smaller grid
      ``h = ceil(H / downsample)``. Each sampled patch spreads one unit of posterior mass over
      its ``K x K`` window, so class ``c``'s total is ``K^2`` times its number of patches.
    """
    image, classes, present, n_patches = _check_sampling(
        image, classes, n_classes, patch_size, downsample, var, class_spread, sample_fraction,
        chunk, rank, position_stride,
    )
    arrays, static = _counts_plan(
        image.shape, present, n_classes, n_patches, patch_size=patch_size, var=var,
        downsample=downsample, temperature=temperature, wrap=wrap, class_spread=class_spread,
        chunk=chunk, plan=plan_for(image) if plan is None else plan, rank=rank,
        position_stride=position_stride,
    )
    return _full_counts(key, image, classes, *arrays, **static)


def self_epitomic_lsr(
    key: ArrayLike,
    image: ArrayLike,
    classes: ArrayLike,
    label_given_class: ArrayLike,
    *,
    patch_size: int = 7,
    var: float = 0.01,
    downsample: int = 1,
    sample_fraction: float | None = 0.05,
    temperature: float | None = None,
    iters: int = 20,
    wrap: bool = False,
    class_spread: str = "window",
    min_share: float = 0.02,
    adapt_rounds: int = 3,
    adapt_strength: float = 0.1,
    concentration: float | ArrayLike = 1.0,
    cell_size: int = 30,
    class_prior: str | ArrayLike | None = None,
    chunk: int | None = None,
    plan: CorrelationPlan | None = None,
    rank: int | None = None,
    position_stride: int = 1,
) -> jax.Array:
    """Self-epitomic label super-resolution of one tile (Sec. 5.1).

    The (optionally ``downsample``-times block-averaged) tile is its own one-layer epitome with
    variance ``var`` and a flat prior. Patches ``K x K`` are taken from the tile, their tempered
    posteriors over the tile's windows embed the coarse classes (Eq. 11), the EM (Eqs. 8-9)
    turns class counts into ``p(l | m, n)``, which is the prediction for pixel ``(m, n)``,
    upsampled back to the input resolution. Runs jitted (a documented entry point).

    Because every variance is equal and the prior flat, the posterior only needs the cross term
    ``<mu_s, x>`` and the window norms ``|mu_s|^2``: one correlation with ``C`` features.

    Args:
      key: PRNG key for patch sampling.
      image: ``[H, W, C]`` imagery (uint8/uint16 scaled to ``[0, 1]``, or float).
      classes: ``[H, W]`` int coarse class index per pixel (rows of ``label_given_class``).
      label_given_class: ``[Cc, n]`` ``p(l | c)``.
      patch_size: ``K`` (odd), at the downsampled resolution.
      var: the fixed variance ``sigma^2``.
      downsample: block-averaging factor (1 = full resolution).
      sample_fraction: patches sampled with replacement ``= round(fraction * H * W)`` (the paper
        used about ``0.05 W^2`` for a ``W x W`` tile); ``None`` = every window once (dense).
      temperature: ``T``; ``None`` = ``K^2`` (per-pixel likelihood, the original setting).
      iters: EM iterations.
      wrap: allow windows that wrap around the tile border (toroidal); by default only windows
        lying inside the tile are positions.
      class_spread: ``"window"`` (Eq. 11, the patch's centre class over its whole window) or
        ``"pixel"`` (each pixel's own class embedded where it maps, Eq. 6 applied to classes).
      min_share: table entries below this share are set to zero before normalising (published
        tables are rounded to 0.01, so e.g. 1 % "water" in forest cells is rounding noise that
        the EM would otherwise have to place somewhere). ``0`` keeps the table as given.
      adapt_rounds: rounds of :func:`adapt_compositions` (``0`` = the paper's plain EM).
      adapt_strength: evidence per coarse cell for the tile's own compositions.
      concentration: Dirichlet concentration of the compositions around the table, scalar or
        ``[Cc]`` (see :func:`dirichlet_concentration`; the NLCD table's s.d. give ~1).
      cell_size: side of one coarse cell in input pixels (30 for NLCD at 1 m); the evidence of
        class ``c`` is ``adapt_strength * (pixels of class c) / cell_size^2``.
      class_prior: ``p(c)`` of the EM (Eq. 7): ``None`` = the tile's observed class proportions
        (the paper); ``"uniform"`` = every row of the table equally, present in the tile or not
        (the published notebook's variant, which pulls labels toward absent classes'
        compositions; rows that are all zero get no weight); or a ``[Cc]`` array.
      chunk: patches per posterior batch (bounds memory; default: from ``plan``'s budgets).
      plan: :class:`~epilsr.correlate.CorrelationPlan` whose budgets decide between unfolded
        windows and correlations and size the posterior batches; ``None``: the plan of the
        image's platform (:func:`~epilsr.correlate.plan_for`).
      rank: ``None`` = the exact posterior (default). An integer ``1 <= r <= K*K*C``: the
        approximate posterior whose cross terms ``<x - m, y - m>`` are taken in the top-``r``
        principal subspace of the tile's patches (norms exact; the error of each cross term
        is at most ``|r_x| |r_y|``, the residuals off the subspace; ``r = K*K*C`` is exact up
        to rounding). Needs ``class_spread="window"``.
      position_stride: ``1`` = every window of the tile is a position (default); ``g > 1``:
        only the corners on a stride-``g`` grid (``g^2`` times fewer exponentials), each
        one's posterior mass shared over the ``g x g`` corners it stands for. Needs
        ``class_spread="window"``. See ``docs/approx_route.md`` for measured speed/accuracy.

    Returns:
      ``[H, W, n]`` per-pixel label probabilities.
    """
    table = jnp.asarray(label_given_class, jnp.float32)
    check_rank("label_given_class", table, 2, "[Cc, n]")
    image, classes, present, n_patches = _check_sampling(
        image, classes, table.shape[0], patch_size, downsample, var, class_spread,
        sample_fraction, chunk, rank, position_stride,
    )
    if present is not None:
        check_distribution_table("label_given_class", table, present)
    if not 0 <= min_share < 1:
        raise ValueError(f"min_share: expected a share in [0, 1), got {min_share}")
    if is_concrete(table):  # the table the EM gets: normalised, small shares dropped
        used = np.asarray(table)
        used = used / np.maximum(used.sum(axis=1, keepdims=True), np.finfo(np.float32).tiny)
        used = np.where(used >= min_share, used, 0.0)
    else:
        used = table
    if present is not None:
        check_distribution_table("label_given_class", used, present)
    if adapt_rounds < 0 or adapt_strength < 0:
        raise ValueError(
            f"adapt_rounds/adapt_strength: expected >= 0, got {adapt_rounds}/{adapt_strength}"
        )
    uniform_prior = isinstance(class_prior, str)
    if uniform_prior:
        if class_prior != "uniform":
            raise ValueError(
                f"class_prior: expected None, 'uniform' or a [Cc] array, got {class_prior!r}"
            )
        class_prior = None
    elif class_prior is not None:
        class_prior = jnp.asarray(class_prior, jnp.float32)
        if class_prior.shape != (table.shape[0],):
            raise ValueError(
                f"class_prior: expected shape ({table.shape[0]},), got {class_prior.shape}"
            )
        check_class_prior("class_prior", class_prior, used)
    arrays, static = _counts_plan(
        image.shape, present, table.shape[0], n_patches, patch_size=patch_size, var=var,
        downsample=downsample, temperature=temperature, wrap=wrap, class_spread=class_spread,
        chunk=chunk, plan=plan_for(image) if plan is None else plan, rank=rank,
        position_stride=position_stride,
    )
    em = (jnp.float32(min_share), jnp.float32(adapt_strength), jnp.float32(cell_size**2),
          concentration, class_prior, adapt_rounds, iters)
    return _self_lsr(key, image, classes, table, *arrays, *em, uniform_prior=uniform_prior,
                     **static)


@functools.partial(jax.jit, static_argnames=("uniform_prior", *_COUNT_STATICS))
def _self_lsr(key, image, classes, table, lookup, rows, var, temperature, min_share,
              adapt_strength, cell_area, concentration, class_prior, rounds, iters, *,
              uniform_prior, **static):
    """The compiled body of :func:`self_epitomic_lsr` (inputs checked): Eq. 11 counts, the
    table's preprocessing, the adapted EM (one loop) and the upsampling.

    With the tile's observed class proportions as ``p(c)`` (``class_prior`` None) the EM runs
    on the compact classes only: an absent class has no mass, hence no weight in Eqs. 8-9 and
    its row of ``p(s|c)`` only adds exact zeros, so the labels are the same at ``P / Cc`` of
    the passes over ``[h, w, Cc]`` (NLCD: 8 of 22)."""
    n_rows = static["n_rows"]
    counts = _compact_counts(key, image, classes, lookup, rows, var, temperature, **static)
    if uniform_prior:
        class_prior = (jnp.sum(table, axis=1) > 0).astype(jnp.float32)  # every defined row
    table = _normalise(table, axis=1)
    table = jnp.where(table >= min_share, table, 0.0)
    pixels = jnp.bincount(classes.ravel(), length=n_rows).astype(jnp.float32)
    concentration = jnp.broadcast_to(jnp.asarray(concentration, jnp.float32), (n_rows,))
    if rows is not None and class_prior is None:  # compact EM (padded slots: no mass)
        table, pixels, concentration = table[rows], pixels[rows], concentration[rows]
    else:
        counts = _scatter_rows(counts, rows, n_rows)
    probs, _ = _adapt_compositions(
        counts, table, class_prior, adapt_strength * pixels / cell_area, concentration, rounds,
        iters,
    )
    return _upsample(probs, static["downsample"], image.shape[:2])
