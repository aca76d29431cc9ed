"""Synthetic Chesapeake-like land-cover scene for label super-resolution (LSR).

This module renders a small, fully synthetic "aerial photo" together with its exact
high-resolution label map and NLCD-like coarse classes, so that LSR can be demonstrated
and tested without downloading anything.  It is the embedded default scene of the README
demo and a test fixture with *known ground truth*: unlike real data, every pixel's true
label is available, so accuracies of label super-resolution can be measured exactly.

The setting mimics the Chesapeake Conservancy land-cover data: 1 m imagery with four bands
(R, G, B, NIR) and four high-resolution labels

    0 water, 1 tree canopy, 2 low vegetation, 3 impervious

while the coarse classes (30 m NLCD in the real data) are obtained by block-aggregating
the label map (``block`` x ``block`` pixel blocks) and binning each block's label
composition (see :data:`CLASS_NAMES` and :func:`classify_blocks`).

Scene content (all sizes in pixels = metres, independent of the scene size, so larger
scenes simply contain more features):

* a rural background of forest (tree canopy) and fields (low vegetation), with ragged
  forest edges, small clearings, hedgerows along field-parcel boundaries and scattered
  field trees;
* meandering rivers (often with a riparian tree buffer) and irregular ponds (water);
* suburban patches: a street grid, lawns, houses with gabled roofs of varied colours,
  driveways and scattered tree crowns (discs of 3-8 px radius) -- so that many coarse
  blocks are mixed; occasionally commercial patches (large flat roofs and parking lots);
* thin roads (2-5 px, straight or gently curved) crossing the whole scene, also through
  forest.

The imagery is rendered per label from colour statistics plus texture: tree canopy is dark
green with high NIR and strongly textured (crowns with self-shadowing and cast shadows),
low vegetation is lighter green to yellow with high-ish NIR and weak texture, water is dark
with very low NIR and smooth, impervious surfaces are grey/bright (asphalt, concrete, roofs
of several colours) with low NIR.  Buildings and trees cast shadows onto their
surroundings, and per-pixel Gaussian noise is added.  The colour distributions overlap
(shadowed lawn vs. canopy, dry fields vs. roofs, green roofs vs. grass), so a per-pixel
colour threshold is not enough, but texture and context make the labels recoverable.

Everything is vectorised NumPy and deterministic given the integer ``seed`` (and the other
arguments); an 8192 x 8192 scene takes tens of seconds and a few GB of memory, of which the
float32 image itself is 1 GiB.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import numpy as np

__all__ = [
    "DEFAULT_LABEL_GIVEN_CLASS",
    "Scene",
    "block_composition",
    "classify_blocks",
    "make_scene",
]

# --------------------------------------------------------------------------------------
# Labels and coarse classes
# --------------------------------------------------------------------------------------

WATER, TREE_CANOPY, LOW_VEGETATION, IMPERVIOUS = 0, 1, 2, 3
LABEL_NAMES: tuple[str, ...] = ("water", "tree canopy", "low vegetation", "impervious")
N_LABELS = len(LABEL_NAMES)

#: Coarse (NLCD-like) class names; the index of a name is its class index in
#: :attr:`Scene.classes`.  Fixed for all seeds, even if a class is absent from a scene.
CLASS_NAMES: tuple[str, ...] = (
    "open water",  # 0
    "developed open",  # 1
    "developed low",  # 2
    "developed medium",  # 3
    "developed high",  # 4
    "forest",  # 5
    "field",  # 6
    "mixed vegetation",  # 7
)
OPEN_WATER, DEV_OPEN, DEV_LOW, DEV_MEDIUM, DEV_HIGH, FOREST, FIELD, MIXED_VEG = range(8)

#: Binning thresholds used by :func:`classify_blocks`.
WATER_MIN = 0.5  # water fraction for "open water"
DEVELOPED_MIN = 0.05  # impervious fraction above which a block counts as developed
DEVELOPED_BINS = (0.2, 0.5, 0.8)  # impervious-fraction edges: open | low | medium | high
PURE_VEG_MIN = 0.7  # tree (resp. low vegetation) fraction for "forest" (resp. "field")

#: Nominal label composition (rows: classes, columns: labels) used for classes that are
#: absent from a scene, so that ``Scene.label_given_class`` always has a row per class.
DEFAULT_LABEL_GIVEN_CLASS = np.array(
    [
        # water, tree, low veg, impervious
        [0.85, 0.07, 0.08, 0.00],  # open water
        [0.02, 0.28, 0.58, 0.12],  # developed open
        [0.01, 0.22, 0.45, 0.32],  # developed low
        [0.00, 0.12, 0.26, 0.62],  # developed medium
        [0.00, 0.03, 0.07, 0.90],  # developed high
        [0.01, 0.88, 0.10, 0.01],  # forest
        [0.01, 0.07, 0.91, 0.01],  # field
        [0.03, 0.48, 0.47, 0.02],  # mixed vegetation
    ],
    dtype=np.float32,
)
DEFAULT_LABEL_GIVEN_CLASS /= DEFAULT_LABEL_GIVEN_CLASS.sum(axis=1, keepdims=True)
DEFAULT_LABEL_GIVEN_CLASS.setflags(write=False)


class Scene(NamedTuple):
    """A synthetic scene with imagery, high-res ground truth and coarse classes."""

    image: np.ndarray  # [H, W, 4] float32 in [0, 1]: R, G, B, NIR
    labels: np.ndarray  # [H, W] int32 in 0..3 (high-res ground truth)
    classes: np.ndarray  # [H, W] int32 coarse class per pixel (constant over each block)
    label_given_class: np.ndarray  # [n_classes, 4] float32, rows sum to 1
    class_names: tuple[str, ...]
    label_names: tuple[str, ...]


def block_composition(labels: np.ndarray, block: int) -> np.ndarray:
    """Label fractions of each ``block`` x ``block`` block: ``[H//block, W//block, 4]``."""
    h, w = labels.shape
    nby, nbx = h // block, w // block
    lab = labels[: nby * block, : nbx * block].reshape(nby, block, nbx, block)
    counts = np.empty((nby, nbx, N_LABELS), dtype=np.float64)
    for k in range(N_LABELS):
        counts[..., k] = np.count_nonzero(lab == k, axis=(1, 3))
    return counts / float(block * block)


def classify_blocks(composition: np.ndarray) -> np.ndarray:
    """Coarse class index (into :data:`CLASS_NAMES`) from label fractions ``[..., 4]``.

    Rules, applied in this order (first match wins), with ``w, t, v, i`` the fractions of
    water, tree canopy, low vegetation and impervious in the block:

    1. ``w >= 0.5``                                  -> "open water"
    2. ``i > 0.05`` ("developed"), binned by ``i``:
       ``i < 0.2`` -> "developed open", ``i < 0.5`` -> "developed low",
       ``i < 0.8`` -> "developed medium", else "developed high"
    3. ``t >= 0.7``                                  -> "forest"
    4. ``v >= 0.7``                                  -> "field"
    5. otherwise                                     -> "mixed vegetation"

    So a forest block crossed by a road is "developed open", as in NLCD.
    """
    comp = np.asarray(composition)
    w, t, v, i = (comp[..., k] for k in range(N_LABELS))
    out = np.full(comp.shape[:-1], MIXED_VEG, dtype=np.int32)
    out[v >= PURE_VEG_MIN] = FIELD
    out[t >= PURE_VEG_MIN] = FOREST
    dev = i > DEVELOPED_MIN
    out[dev] = DEV_OPEN + np.searchsorted(DEVELOPED_BINS, i[dev], side="right")
    out[w >= WATER_MIN] = OPEN_WATER
    return out


# --------------------------------------------------------------------------------------
# Materials (for rendering) and their albedo in R, G, B, NIR
# --------------------------------------------------------------------------------------

M_FIELD, M_LAWN, M_TREE, M_WATER, M_ASPHALT, M_CONCRETE, M_PARKING, M_FLATROOF = range(8)
M_ROOF0 = 8  # first of the house-roof materials
_PALETTE = np.array(
    [
        [0.18, 0.28, 0.14, 0.45],  # field (lerped to _FIELD_DRY / _SOIL per parcel)
        [0.17, 0.27, 0.12, 0.45],  # lawn
        [0.14, 0.23, 0.11, 0.42],  # tree, deciduous (lerped to _CONIFER)
        [0.06, 0.09, 0.11, 0.04],  # water, clear (lerped to _TURBID)
        [0.27, 0.27, 0.28, 0.24],  # asphalt
        [0.52, 0.51, 0.48, 0.43],  # concrete
        [0.35, 0.35, 0.36, 0.31],  # parking lot
        [0.64, 0.64, 0.62, 0.55],  # flat commercial roof
        # house roofs
        [0.20, 0.20, 0.22, 0.18],  # dark grey shingles
        [0.40, 0.39, 0.38, 0.34],  # mid grey
        [0.45, 0.27, 0.21, 0.35],  # red-brown
        [0.54, 0.47, 0.37, 0.43],  # tan
        [0.72, 0.72, 0.70, 0.61],  # white
        [0.25, 0.36, 0.30, 0.28],  # green metal
    ],
    dtype=np.float32,
)
N_ROOFS = len(_PALETTE) - M_ROOF0
_FIELD_DRY = np.array([0.42, 0.40, 0.28, 0.34], dtype=np.float32)
_SOIL = np.array([0.40, 0.34, 0.27, 0.29], dtype=np.float32)  # bare / ploughed parcels
_CONIFER = np.array([0.09, 0.15, 0.09, 0.30], dtype=np.float32)
_TURBID = np.array([0.20, 0.22, 0.16, 0.10], dtype=np.float32)

_TONE0 = 0.25  # field tone above which fields look dry/yellow (parcel boundary)
_CHUNK_PIXELS = 1 << 22  # rows are processed in chunks of about this many pixels


# --------------------------------------------------------------------------------------
# Smooth random fields
# --------------------------------------------------------------------------------------


class _Smooth:
    """Unit-variance Gaussian-filtered white noise, stored at reduced resolution.

    The noise is generated by FFT filtering at ``1/f`` of the full resolution (``f`` grows
    with ``sigma``) and bilinearly upsampled on demand, for any window of the full grid.
    """

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int], sigma: float):
        h, w = shape
        f = max(1, int(sigma // 3))
        lh, lw = (h, w) if f == 1 else (-(-h // f) + 2, -(-w // f) + 2)
        white = rng.standard_normal((lh, lw), dtype=np.float32)
        s = sigma / f
        ky = np.fft.fftfreq(lh).astype(np.float32)
        kx = np.fft.rfftfreq(lw).astype(np.float32)
        gain = np.exp(-2.0 * math.pi**2 * s**2 * ky[:, None] ** 2) * np.exp(
            -2.0 * math.pi**2 * s**2 * kx[None, :] ** 2
        )
        spec = np.fft.rfft2(white)
        del white
        spec *= gain
        low = np.fft.irfft2(spec, s=(lh, lw)).astype(np.float32, copy=False)
        del spec
        low -= low.mean()
        low /= max(float(low.std()), 1e-12)
        self.low, self.f, self.shape = low, f, shape

    def grad_norm(self) -> _Smooth:
        """|gradient| (per full-res pixel) as a field with the same sampling."""
        gy, gx = np.gradient(self.low)
        out = object.__new__(_Smooth)
        out.low = (np.hypot(gy, gx) / self.f).astype(np.float32)
        out.f, out.shape = self.f, self.shape
        return out

    def _axis(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        c = (np.arange(a, b, dtype=np.float64) + 0.5) / self.f + 0.5
        i0 = np.floor(c).astype(np.intp)
        return i0, (c - i0).astype(np.float32)

    def window(self, r0: int, r1: int, c0: int = 0, c1: int | None = None) -> np.ndarray:
        """The field on full-res rows ``r0:r1`` and columns ``c0:c1`` (float32)."""
        c1 = self.shape[1] if c1 is None else c1
        if self.f == 1:
            return self.low[r0:r1, c0:c1]
        y0, wy = self._axis(r0, r1)
        x0, wx = self._axis(c0, c1)
        lo = self.low[:, x0[0] : x0[-1] + 2] if len(x0) else self.low[:, :0]
        x0 = x0 - (x0[0] if len(x0) else 0)
        t = lo[y0] * (1.0 - wy)[:, None]
        t += lo[y0 + 1] * wy[:, None]
        out = t[:, x0] * (1.0 - wx)
        out += t[:, x0 + 1] * wx
        return out


def _row_chunks(h: int, w: int):
    step = max(1, _CHUNK_PIXELS // max(w, 1))
    for r0 in range(0, h, step):
        yield r0, min(h, r0 + step)


# --------------------------------------------------------------------------------------
# Canvas and painting primitives
# --------------------------------------------------------------------------------------


class _Canvas:
    def __init__(self, h: int, w: int):
        self.h, self.w = h, w
        self.labels = np.empty((h, w), dtype=np.uint8)
        self.material = np.empty((h, w), dtype=np.uint8)
        self.height = np.zeros((h, w), dtype=np.float32)  # metres; 0 = ground

    def clip(self, y0, y1, x0, x1):
        y0, y1 = max(0, int(y0)), min(self.h, int(y1))
        x0, x1 = max(0, int(x0)), min(self.w, int(x1))
        if y0 >= y1 or x0 >= x1:
            return None
        return slice(y0, y1), slice(x0, x1)

    def rect(self, y0, y1, x0, x1, label, material, *, over_water=True):
        win = self.clip(y0, y1, x0, x1)
        if win is None:
            return
        if over_water:
            self.labels[win] = label
            self.material[win] = material
            self.height[win] = 0.0
        else:
            m = self.labels[win] != WATER
            self.labels[win][m] = label
            self.material[win][m] = material
            self.height[win][m] = 0.0

    def touches_water(self, y0, y1, x0, x1) -> bool:
        win = self.clip(y0, y1, x0, x1)
        return win is not None and bool((self.labels[win] == WATER).any())

    def tree(self, cy: float, cx: float, r: float, top: float):
        """A round crown (disc of canopy) with a dome-shaped height profile."""
        win = self.clip(
            math.floor(cy - r), math.ceil(cy + r) + 1, math.floor(cx - r), math.ceil(cx + r) + 1
        )
        if win is None:
            return
        yy = np.arange(win[0].start, win[0].stop, dtype=np.float32)[:, None] - cy
        xx = np.arange(win[1].start, win[1].stop, dtype=np.float32)[None, :] - cx
        q = (yy * yy + xx * xx) / (r * r)
        m = (q <= 1.0) & (self.labels[win] != WATER)
        dome = top * (0.55 + 0.45 * np.sqrt(np.clip(1.0 - q, 0.0, 1.0)))
        self.labels[win][m] = TREE_CANOPY
        self.material[win][m] = M_TREE
        self.height[win][m] = dome[m]

    def house(self, y0, y1, x0, x1, roof: int):
        """A gabled house, ridge along its longer side."""
        win = self.clip(y0, y1, x0, x1)
        if win is None:
            return
        self.labels[win] = IMPERVIOUS
        self.material[win] = M_ROOF0 + roof
        ny, nx = y1 - y0, x1 - x0
        n = min(ny, nx)
        across = np.abs(np.arange(n, dtype=np.float32) - (n - 1) / 2.0)
        prof = 3.5 + 0.55 * ((n - 1) / 2.0 - across)  # ~29 degree roof pitch
        prof = prof[:, None] if ny <= nx else prof[None, :]
        full = np.broadcast_to(prof, (ny, nx))
        oy, ox = win[0].start - y0, win[1].start - x0
        self.height[win] = full[
            oy : oy + win[0].stop - win[0].start, ox : ox + win[1].stop - win[1].start
        ]


def _curve(rng, length: int, c0: float, slope: float, n_waves: int, lam: tuple, amp: tuple):
    """Centre line c(t) of a gently curved linear feature, t = 0..length-1."""
    t = np.arange(length, dtype=np.float64)
    c = c0 + slope * (t - length / 2.0)
    for _ in range(n_waves):
        lm = rng.uniform(*lam)
        a = rng.uniform(*amp) * lm / (2.0 * math.pi)  # max derivative = amp
        c += a * np.sin(2.0 * math.pi * t / lm + rng.uniform(0.0, 2.0 * math.pi))
    return c


def _band_pixels(c: np.ndarray, hw: np.ndarray, n_across: int, vertical: bool):
    """Pixels within perpendicular distance ``hw`` of the curve ``across = c(along)``."""
    slope = np.gradient(c) if len(c) > 1 else np.zeros_like(c)
    stretch = np.sqrt(1.0 + slope * slope)
    reach = int(math.ceil(float((hw * stretch).max()))) + 1
    off = np.arange(-reach, reach + 1)
    across = np.round(c).astype(np.int64)[None, :] + off[:, None]
    dist = np.abs(across - c[None, :]) / stretch[None, :]
    keep = (dist <= hw) & (across >= 0) & (across < n_across)
    along = np.broadcast_to(np.arange(len(c))[None, :], across.shape)
    a, b = across[keep], along[keep]
    return (b, a) if vertical else (a, b)


def _random_linear(rng, cv: _Canvas, *, river: bool):
    vertical = bool(rng.random() < 0.5)
    length, n_across = (cv.h, cv.w) if vertical else (cv.w, cv.h)
    c0 = rng.uniform(0.1, 0.9) * n_across
    if river:
        c = _curve(rng, length, c0, rng.uniform(-0.3, 0.3), 3, (150.0, 700.0), (0.1, 0.45))
    else:
        c = _curve(rng, length, c0, rng.uniform(-0.35, 0.35), 1, (400.0, 2000.0), (0.0, 0.2))
    return c, n_across, vertical


def _add_river(rng, cv: _Canvas):
    c, n_across, vertical = _random_linear(rng, cv, river=True)
    t = np.arange(len(c))
    hw = rng.uniform(3.5, 10.0) * (
        1.0 + 0.25 * np.sin(2 * math.pi * t / rng.uniform(200, 900) + rng.uniform(0, 2 * math.pi))
    )
    buf = np.clip(
        rng.uniform(-4.0, 9.0)
        + 6.0 * np.sin(2 * math.pi * t / rng.uniform(150, 600) + rng.uniform(0, 2 * math.pi)),
        0,
        12,
    )
    ys, xs = _band_pixels(c, hw + buf, n_across, vertical)
    m = cv.material[ys, xs] == M_FIELD
    cv.labels[ys[m], xs[m]] = TREE_CANOPY
    cv.material[ys[m], xs[m]] = M_TREE
    ys, xs = _band_pixels(c, hw, n_across, vertical)
    cv.labels[ys, xs] = WATER
    cv.material[ys, xs] = M_WATER
    cv.height[ys, xs] = 0.0


def _add_pond(rng, cv: _Canvas):
    cy, cx = rng.uniform(0, cv.h), rng.uniform(0, cv.w)
    a, b = rng.uniform(8, 38), rng.uniform(8, 38)
    th = rng.uniform(0, math.pi)
    ks = np.arange(2, 6)
    ca = rng.uniform(0, 0.25, size=len(ks)) / ks
    ph = rng.uniform(0, 2 * math.pi, size=len(ks))
    ring = 1.35 if rng.random() < 0.5 else 1.0  # riparian trees around half of the ponds
    rmax = max(a, b) * 1.6 * ring
    win = cv.clip(cy - rmax, cy + rmax + 1, cx - rmax, cx + rmax + 1)
    if win is None:
        return
    yy = np.arange(win[0].start, win[0].stop, dtype=np.float32)[:, None] - cy
    xx = np.arange(win[1].start, win[1].stop, dtype=np.float32)[None, :] - cx
    u = (yy * math.cos(th) + xx * math.sin(th)) / a
    v = (-yy * math.sin(th) + xx * math.cos(th)) / b
    rho = np.sqrt(u * u + v * v)
    ang = np.arctan2(v, u)
    edge = 1.0 + sum(ca[i] * np.cos(ks[i] * ang + ph[i]) for i in range(len(ks)))
    lab, mat, hgt = cv.labels[win], cv.material[win], cv.height[win]
    bank = (rho <= edge * ring) & (mat == M_FIELD)
    lab[bank] = TREE_CANOPY
    mat[bank] = M_TREE
    water = rho <= edge
    lab[water] = WATER
    mat[water] = M_WATER
    hgt[water] = 0.0


def _add_suburb(rng, cv: _Canvas, retention: _Smooth):
    sh = max(1, int(min(0.6 * cv.h, rng.uniform(80, 210))))
    sw = max(1, int(min(0.6 * cv.w, rng.uniform(80, 210))))
    y0 = int(rng.integers(0, cv.h - sh + 1))
    x0 = int(rng.integers(0, cv.w - sw + 1))
    win = (slice(y0, y0 + sh), slice(x0, x0 + sw))
    # lawns everywhere except water and some retained woodland
    lab, mat, hgt = cv.labels[win], cv.material[win], cv.height[win]
    keep = (lab == TREE_CANOPY) & (retention.window(y0, y0 + sh, x0, x0 + sw) > 0.4)
    lawn = (lab != WATER) & ~keep
    lab[lawn] = LOW_VEGETATION
    mat[lawn] = M_LAWN
    hgt[lawn] = 0.0

    horiz = bool(rng.random() < 0.5)  # streets run along x
    along_n, across_n = (sw, sh) if horiz else (sh, sw)

    def paint(v0, v1, u0, u1, fn, *args, **kw):
        # local (across v, along u) rectangle -> global
        if horiz:
            fn(y0 + v0, y0 + v1, x0 + u0, x0 + u1, *args, **kw)
        else:
            fn(y0 + u0, y0 + u1, x0 + v0, x0 + v1, *args, **kw)

    def touches_water(v0, v1, u0, u1):
        if horiz:
            return cv.touches_water(y0 + v0, y0 + v1, x0 + u0, x0 + u1)
        return cv.touches_water(y0 + u0, y0 + u1, x0 + v0, x0 + v1)

    def tree(v, u, r, top):
        if horiz:
            cv.tree(y0 + v, x0 + u, r, top)
        else:
            cv.tree(y0 + u, x0 + v, r, top)

    spacing = int(rng.integers(56, 84))
    width = int(rng.integers(4, 7))
    streets = list(range(int(rng.integers(spacing // 4, spacing // 2 + 1)), across_n, spacing))
    cross = [int(rng.integers(along_n // 4, 3 * along_n // 4 + 1))]
    if along_n > 180:
        cross.append(int(rng.integers(0, 12)))
    half_lot = spacing / 2.0 - width / 2.0 - 2.0
    lots = []
    for v in streets:
        for side in (-1, 1):
            edge = v - width // 2 if side < 0 else v - width // 2 + width
            u = int(rng.integers(0, 8))
            while u + 16 <= along_n:
                front = int(rng.integers(20, 31))
                lots.append((edge, side, u, min(front, along_n - u)))
                u += front
    for v in streets:
        paint(v - width // 2, v - width // 2 + width, 0, along_n, cv.rect, IMPERVIOUS, M_ASPHALT)
    for u in cross:
        paint(0, across_n, u - width // 2, u - width // 2 + width, cv.rect, IMPERVIOUS, M_ASPHALT)
    for edge, side, u, front in lots:
        if any(u - 4 <= uc <= u + front + 4 for uc in cross) or rng.random() < 0.1:
            house = None
        else:
            hu = int(rng.integers(9, max(10, min(17, front - 3))))
            depth = int(rng.integers(8, 15))
            setback = int(rng.integers(3, 9))
            depth = min(depth, int(half_lot) - setback)
            hu0 = u + int(rng.integers(1, max(2, front - hu)))
            if side > 0:
                hv0, hv1, dv0, dv1 = edge + setback, edge + setback + depth, edge, edge + setback
            else:
                hv0, hv1, dv0, dv1 = edge - setback - depth, edge - setback, edge - setback, edge
            house = (hv0, hv1, hu0, hu0 + hu, dv0, dv1)
            if (
                depth < 6
                or min(hv0, dv0) < 0
                or max(hv1, dv1) > across_n
                or touches_water(hv0 - setback, hv1 + setback, hu0, hu0 + hu)
            ):
                house = None
        if house is not None:
            hv0, hv1, hu0, hu1, dv0, dv1 = house
            paint(hv0, hv1, hu0, hu1, cv.house, int(rng.integers(0, N_ROOFS)))
            du = hu0 if rng.random() < 0.5 else hu1 - 3
            paint(dv0, dv1, du, du + 3, cv.rect, IMPERVIOUS, M_CONCRETE)
        for _ in range(int(rng.poisson(1.4))):
            r = rng.uniform(3.0, 8.0)
            dv = rng.uniform(1.0, half_lot + 2.0)
            tree(edge + side * dv, u + rng.uniform(0, front), r, rng.uniform(5, 9) + 0.8 * r)


def _add_commercial(rng, cv: _Canvas):
    sh = max(1, int(min(0.6 * cv.h, rng.uniform(90, 230))))
    sw = max(1, int(min(0.6 * cv.w, rng.uniform(90, 230))))
    y0 = int(rng.integers(0, cv.h - sh + 1))
    x0 = int(rng.integers(0, cv.w - sw + 1))
    b = int(rng.integers(3, 7))
    cv.rect(y0, y0 + sh, x0, x0 + sw, LOW_VEGETATION, M_LAWN, over_water=False)
    cv.rect(y0 + b, y0 + sh - b, x0 + b, x0 + sw - b, IMPERVIOUS, M_PARKING, over_water=False)
    for _ in range(int(rng.integers(1, 4))):
        bh = int(rng.uniform(24, max(25, min(90, sh - 2 * b - 8))))
        bw = int(rng.uniform(24, max(25, min(90, sw - 2 * b - 8))))
        by = y0 + b + 4 + int(rng.integers(0, max(1, sh - 2 * b - 8 - bh)))
        bx = x0 + b + 4 + int(rng.integers(0, max(1, sw - 2 * b - 8 - bw)))
        if cv.touches_water(by, by + bh, bx, bx + bw):
            continue
        roof = M_FLATROOF if rng.random() < 0.6 else M_ROOF0 + int(rng.integers(0, N_ROOFS))
        cv.rect(by, by + bh, bx, bx + bw, IMPERVIOUS, roof)
        win = cv.clip(by, by + bh, bx, bx + bw)
        cv.height[win] = rng.uniform(6.0, 10.0)
    # trees along the border strip
    per = 2 * (sh + sw)
    for s in np.arange(rng.uniform(0, 15), per, rng.uniform(10, 20)):
        if rng.random() < 0.35:
            continue
        if s < sw:
            cy, cx = y0 + b / 2, x0 + s
        elif s < sw + sh:
            cy, cx = y0 + s - sw, x0 + sw - b / 2
        elif s < 2 * sw + sh:
            cy, cx = y0 + sh - b / 2, x0 + (s - sw - sh)
        else:
            cy, cx = y0 + (s - 2 * sw - sh), x0 + b / 2
        r = rng.uniform(3.0, 6.0)
        cv.tree(cy, cx, r, rng.uniform(5, 8) + 0.8 * r)


def _add_road(rng, cv: _Canvas):
    c, n_across, vertical = _random_linear(rng, cv, river=False)
    hw = np.full(len(c), rng.uniform(2.0, 5.0) / 2.0)
    ys, xs = _band_pixels(c, hw, n_across, vertical)
    cv.labels[ys, xs] = IMPERVIOUS
    cv.material[ys, xs] = M_PARKING if rng.random() < 0.2 else M_ASPHALT
    cv.height[ys, xs] = 0.0


# --------------------------------------------------------------------------------------
# Rendering helpers
# --------------------------------------------------------------------------------------


def _shift_slices(n: int, o: int) -> tuple[slice, slice]:
    """(dst, src) slices with src index = dst index + o, both within 0..n-1."""
    return slice(max(0, -o), n - max(0, o)), slice(max(0, o), n + min(0, o))


def _cast_shadows(height: np.ndarray, sun: tuple[float, float], px_per_m: float) -> np.ndarray:
    """Boolean map of pixels shadowed by higher objects towards the sun (ray marching)."""
    h, w = height.shape
    shadow = np.zeros((h, w), dtype=bool)
    top = float(height.max()) if height.size else 0.0
    steps = int(math.ceil(top * px_per_m))
    for r0, r1 in _row_chunks(h, w):
        for s in range(1, steps + 1):
            oy, ox = int(round(s * sun[0])), int(round(s * sun[1]))
            ry0, ry1 = max(r0, -oy), min(r1, h - oy)
            if ry0 >= ry1:
                continue
            dx, sx = _shift_slices(w, ox)
            blocker = height[ry0 + oy : ry1 + oy, sx] - s / px_per_m
            np.logical_or(
                shadow[ry0:ry1, dx], blocker > height[ry0:ry1, dx] + 0.3, out=shadow[ry0:ry1, dx]
            )
    return shadow


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


def _check_args(seed, size, block, noise) -> tuple[int, int, int, int, float]:
    try:
        seed = operator.index(seed)
    except TypeError as e:
        raise TypeError(f"seed must be an integer, got {seed!r}") from e
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    try:
        block = operator.index(block)
    except TypeError as e:
        raise ValueError(f"block must be a positive integer, got {block!r}") from e
    if block <= 0:
        raise ValueError(f"block must be a positive integer, got {block}")
    try:
        dims = (size, size) if np.ndim(size) == 0 else tuple(size)
        h, w = (operator.index(d) for d in dims)
    except (TypeError, ValueError) as e:
        raise ValueError(f"size must be an integer or an (height, width) pair, got {size!r}") from e
    if h <= 0 or w <= 0 or h % block or w % block:
        raise ValueError(
            f"size must be a positive multiple of block={block} (per dimension), got {size!r}"
        )
    try:
        noise = float(noise)
    except (TypeError, ValueError) as e:
        raise ValueError(f"noise must be a non-negative number, got {noise!r}") from e
    if not (noise >= 0.0 and math.isfinite(noise)):
        raise ValueError(f"noise must be a non-negative finite number, got {noise!r}")
    return seed, h, w, block, noise


def make_scene(
    seed: int = 0,
    *,
    size: int | tuple[int, int] = 256,
    block: int = 32,
    noise: float = 0.03,
) -> Scene:
    """Render a deterministic synthetic scene (see the module docstring).

    Args:
      seed: non-negative integer; the scene is a deterministic function of all arguments.
      size: side length in pixels, or a ``(height, width)`` pair; each must be a positive
        multiple of ``block``.
      block: side of the square blocks over which coarse classes are defined (e.g. 30 for
        30 m NLCD over 1 m imagery; default 32).
      noise: standard deviation of the i.i.d. Gaussian noise added to every band.

    Returns:
      A :class:`Scene`.  ``classes`` follows :func:`classify_blocks` applied to each block's
      label composition; ``label_given_class[c]`` is the mean label composition of the
      blocks of class ``c`` in this scene, or ``DEFAULT_LABEL_GIVEN_CLASS[c]`` if ``c`` is
      absent.

    Raises:
      ValueError: if ``size``, ``block`` or ``noise`` is invalid (message names it).
    """
    seed, h, w, block, noise = _check_args(seed, size, block, noise)
    rng = np.random.default_rng(seed)
    shape = (h, w)
    area = h * w / 512.0**2
    lin = math.sqrt(h * w) / 512.0
    # The order of the random draws below defines the scene: keep it.
    f = {name: _Smooth(rng, shape, scale) for name, scale in _LAND_FIELDS}
    cv = _rural_background(h, w, f)
    _add_water(rng, cv, area, lin)
    _add_developed(rng, cv, f["retention"], area, lin)
    f.update({name: _Smooth(rng, shape, scale) for name, scale in _RENDER_FIELDS})
    _set_heights(cv, f)
    image = _render(rng, cv, f, noise)
    labels = cv.labels.astype(np.int32)
    classes, table = _coarse_classes(cv.labels, block)
    return Scene(
        image=image,
        labels=labels,
        classes=classes,
        label_given_class=table,
        class_names=CLASS_NAMES,
        label_names=LABEL_NAMES,
    )


# Smooth random fields (name, length scale in px), drawn in this order before the land cover,
# then the rendering ones after it.
_LAND_FIELDS = (
    ("forest", 64.0), ("forest2", 12.0), ("clearing", 6.0),
    ("tone", 40.0),  # field parcels; hedgerows along its zero set
    ("hedge", 60.0), ("ftree", 6.0), ("cluster", 30.0),
    ("crown", 2.0),  # full resolution: crown texture
    ("retention", 9.0),
)
_RENDER_FIELDS = (("conifer", 70.0), ("turbid", 25.0), ("soil", 45.0), ("jitter", 25.0))


def _rural_background(h: int, w: int, f: dict) -> _Canvas:
    """Forest, hedgerows along field-parcel edges and field trees over low vegetation."""
    cv = _Canvas(h, w)
    tone_g = f["tone"].grad_norm()
    for r0, r1 in _row_chunks(h, w):
        cr = f["crown"].window(r0, r1)
        v = 0.9 * f["forest"].window(r0, r1) + 0.33 * f["forest2"].window(r0, r1) + 0.12 * cr
        forest = (v > 0.2) & (f["clearing"].window(r0, r1) < 2.3)
        tone = f["tone"].window(r0, r1) - _TONE0
        hedge = (np.abs(tone) < 1.6 * tone_g.window(r0, r1)) & (f["hedge"].window(r0, r1) > 0.7)
        hedge &= cr > -1.2  # gaps
        ftree = f["ftree"].window(r0, r1) > 2.8 - 0.5 * f["cluster"].window(r0, r1)
        tree = forest | hedge | ftree & (v > -0.3)
        cv.labels[r0:r1] = np.where(tree, TREE_CANOPY, LOW_VEGETATION)
        cv.material[r0:r1] = np.where(tree, M_TREE, M_FIELD)
    return cv


def _add_water(rng: np.random.Generator, cv: _Canvas, area: float, lin: float) -> None:
    """Rivers and ponds; at least one of either."""
    n_rivers = int(rng.poisson(0.45 * lin))
    n_ponds = int(rng.poisson(0.7 * area))
    if n_rivers + n_ponds == 0:
        if rng.random() < 0.5:
            n_rivers = 1
        else:
            n_ponds = 1
    for _ in range(n_rivers):
        _add_river(rng, cv)
    for _ in range(n_ponds):
        _add_pond(rng, cv)


def _add_developed(rng, cv: _Canvas, retention, area: float, lin: float) -> None:
    """Suburbs (at least one), commercial areas and roads (at least one)."""
    for _ in range(max(1, int(rng.poisson(1.2 * area)))):
        _add_suburb(rng, cv, retention)
    for _ in range(int(rng.poisson(0.3 * area))):
        _add_commercial(rng, cv)
    for _ in range(max(1, int(rng.poisson(1.5 * lin)))):
        _add_road(rng, cv)


def _set_heights(cv: _Canvas, f: dict) -> None:
    """Canopy without a crown profile gets a forest canopy height; the ground is at 0."""
    h, w = cv.labels.shape
    for r0, r1 in _row_chunks(h, w):
        lab, hgt = cv.labels[r0:r1], cv.height[r0:r1]
        cr = f["crown"].window(r0, r1)
        is_tree = lab == TREE_CANOPY
        forest_h = 11.0 + 4.0 * np.tanh(1.2 * cr) + 2.0 * f["conifer"].window(r0, r1)
        hgt[:] = np.where(is_tree, np.where(hgt > 0, hgt + 0.8 * cr, forest_h), hgt)
        hgt[(lab != TREE_CANOPY) & (lab != IMPERVIOUS)] = 0.0
        hgt[(lab == IMPERVIOUS) & (cv.material[r0:r1] < M_FLATROOF)] = 0.0


def _albedo(lab: np.ndarray, mat: np.ndarray, f: dict, r0: int, r1: int) -> np.ndarray:
    """``[n, W, 4]`` surface reflectance: materials varied by soil, dryness, conifers, turbidity."""
    alb = _PALETTE[mat]
    m = mat == M_FIELD
    t = 0.5 + 0.5 * np.tanh(2.0 * (f["tone"].window(r0, r1)[m] - _TONE0))
    fa = _PALETTE[M_FIELD] + t[:, None] * (_FIELD_DRY - _PALETTE[M_FIELD])
    t = 0.5 + 0.5 * np.tanh(4.0 * (f["soil"].window(r0, r1)[m] - 0.9))
    alb[m] = fa + t[:, None] * (_SOIL - fa)
    m = lab == TREE_CANOPY
    t = np.clip(0.5 + 0.6 * f["conifer"].window(r0, r1)[m], 0.0, 1.0)
    alb[m] = _PALETTE[M_TREE] + t[:, None] * (_CONIFER - _PALETTE[M_TREE])
    m = lab == WATER
    t = np.clip(0.4 + 0.4 * f["turbid"].window(r0, r1)[m], 0.0, 1.0)
    alb[m] = _PALETTE[M_WATER] + t[:, None] * (_TURBID - _PALETTE[M_WATER])
    return alb


def _shading(cv: _Canvas, f: dict, shadow: np.ndarray, sun_step, r0: int, r1: int) -> np.ndarray:
    """``[n, W]`` brightness multiplier: slope towards the sun, crown texture, cast shadows."""
    lab, mat = cv.labels[r0:r1], cv.material[r0:r1]
    (ey, ex), step = sun_step
    h, w = lab.shape[0], lab.shape[1]
    full_h = cv.height.shape[0]
    # slope towards the sun (central difference on the height map)
    pad = np.pad(
        cv.height[max(0, r0 - 1) : min(full_h, r1 + 1)],
        ((int(r0 == 0), int(r1 == full_h)), (1, 1)),
        mode="edge",
    )
    fwd = pad[1 + ey : 1 + ey + h, 1 + ex : 1 + ex + w]
    bwd = pad[1 - ey : 1 - ey + h, 1 - ex : 1 - ex + w]
    g = (fwd - bwd) / (2.0 * step)
    cr = f["crown"].window(r0, r1)
    mult = 1.0 + 0.1 * f["jitter"].window(r0, r1)
    is_tree = lab == TREE_CANOPY
    mult[is_tree] *= (0.78 + 0.45 * np.tanh(1.2 * cr[is_tree])) * (
        1.0 + 0.12 * np.clip(g[is_tree], -2.5, 2.5)
    )
    grass = lab == LOW_VEGETATION
    mult[grass] *= 1.0 + 0.05 * cr[grass]
    roof = (mat >= M_FLATROOF) & (lab == IMPERVIOUS)
    gr = g[roof]
    mult[roof] *= 1.0 + np.where(np.abs(gr) < 1.2, 0.35 * gr, 0.0)
    paved = (lab == IMPERVIOUS) & ~roof
    mult[paved] *= 1.0 + 0.04 * cr[paved]
    sh = shadow[r0:r1]
    mult[sh] *= np.where(lab[sh] == WATER, 0.7, 0.45)
    return mult


def _render(rng: np.random.Generator, cv: _Canvas, f: dict, noise: float) -> np.ndarray:
    """``[H, W, 4]`` float32 imagery in ``[0, 1]``: albedo x shading under a random sun, + noise."""
    h, w = cv.labels.shape
    az = rng.uniform(0.0, 2.0 * math.pi)
    sun = (math.sin(az), math.cos(az))  # (dy, dx) towards the sun
    px_per_m = rng.uniform(0.35, 0.6)  # shadow length per metre of height
    shadow = _cast_shadows(cv.height, sun, px_per_m)
    e = max(abs(sun[0]), abs(sun[1]))
    ey, ex = int(round(sun[0] / e)), int(round(sun[1] / e))
    sun_step = ((ey, ex), math.hypot(ey, ex))
    image = np.empty((h, w, 4), dtype=np.float32)
    for r0, r1 in _row_chunks(h, w):
        img = _albedo(cv.labels[r0:r1], cv.material[r0:r1], f, r0, r1)
        img *= _shading(cv, f, shadow, sun_step, r0, r1)[..., None]
        if noise > 0:
            img += noise * rng.standard_normal(img.shape, dtype=np.float32)
        np.clip(img, 0.0, 1.0, out=img)
        image[r0:r1] = img
    return image


def _coarse_classes(labels: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``[H, W]`` class of each pixel's block and the scene's ``label_given_class`` (the mean
    composition of the blocks of each class, or the default row for absent classes)."""
    comp = block_composition(labels, block)
    cls = classify_blocks(comp)
    table = DEFAULT_LABEL_GIVEN_CLASS.copy()
    for c in range(len(CLASS_NAMES)):
        sel = cls == c
        if sel.any():
            row = comp[sel].mean(axis=0)
            table[c] = row / row.sum()
    return np.repeat(np.repeat(cls, block, axis=0), block, axis=1), table
