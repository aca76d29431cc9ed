"""Lymphocytes (TILs) in pathology by epitomic label super-resolution (paper Sec. 5.2).

The only supervision is a coarse map of TIL density classes per block. The pipeline composes
the public functions of the package:

1. :func:`train_epitome` -- an epitome of H&E patches (``11..31`` px) by
   :func:`epilsr.make_train_step` (location promotion; ``quantile=0.25`` = diversified,
   ``1.0`` = not);
2. :func:`embed_coarse` -- :func:`epilsr.embed_classes` (Eq. 11) of ``11 x 11`` patches, each
   carrying the density class of the block under its centre pixel;
3. :func:`til_label_probs` -- :func:`epilsr.super_resolve` (Eqs. 8-9) with a uniform ``p(c)``
   (as in the paper) into ``p(TIL | m, n)``, optionally :func:`box_smooth` ed (the paper's better
   variant: the probability of TIL *anywhere* in an ``11 x 11`` window);
4. :func:`predict_til` -- :func:`epilsr.predict` (Eq. 2): each pixel's score is the mean of
   ``sum_s p(s|x) p(TIL | s + u)`` over the patches covering it;
5. optionally :func:`coarse_posterior` -- the test image's own coarse classes combined with the
   scores by the block-level update of Eq. 9;
6. evaluation: :func:`nucleus_scores`, :func:`nucleus_auc` (ROC AUC per nucleus),
   :func:`bootstrap_auc` (intervals over patches) and :func:`pixel_auc`.

Stain-aware epitomes: :func:`stain_image` appends a hematoxylin channel (colour
deconvolution, :func:`hematoxylin`) to RGB, so patches are matched on the nuclear stain too.
The self-epitomic variant is :func:`self_epitomic_til` (each patch is its own epitome).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike
from skimage.color import rgb2hed

from epilsr import metrics
from epilsr.correlate import box_sum
from epilsr.embed import embed_classes
from epilsr.epitome import Epitome, init_epitome
from epilsr.lsr import super_resolve
from epilsr.predict import predict
from epilsr.samplers import PATCH_SIZES, patch_sizes, sample_labelled_patches, sample_patches
from epilsr.self_epitomic import self_epitomic_lsr
from epilsr.train import make_train_step, train_init

__all__ = [
    "H_REF",
    "hematoxylin",
    "stain_image",
    "pixel_classes",
    "train_epitome",
    "embed_coarse",
    "til_label_probs",
    "box_smooth",
    "predict_til",
    "coarse_posterior",
    "self_epitomic_til",
    "nucleus_scores",
    "nucleus_auc",
    "pixel_auc",
    "bootstrap_auc",
]

#: Hematoxylin optical density mapped to 1 by :func:`stain_image` (about the 99.5th percentile
#: of CoNSeP nuclei).
H_REF = 0.25


# --------------------------------------------------------------------------- stain, classes


def hematoxylin(images: ArrayLike) -> np.ndarray:
    """Hematoxylin optical density by colour deconvolution (``skimage.color.rgb2hed``).

    Args:
      images: ``[..., H, W, 3]`` RGB (uint8, or float in ``[0, 1]``).

    Returns:
      ``[..., H, W]`` float32 (higher = more nuclear stain).
    """
    images = np.asarray(images)
    if images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(f"images: expected [..., H, W, 3] RGB, got shape {images.shape}")
    flat = images.reshape(-1, *images.shape[-3:])
    out = np.stack([rgb2hed(im)[..., 0] for im in flat]).astype(np.float32)
    return out.reshape(images.shape[:-1])


def stain_image(images: ArrayLike, *, weight: float = 1.0, h_ref: float = H_REF) -> np.ndarray:
    """RGB in ``[0, 1]`` with a hematoxylin channel appended: ``[..., H, W, 3] -> [..., H, W, 4]``.

    The fourth channel is ``weight * clip(H / h_ref, 0, 1)``; ``weight = 0`` returns plain RGB
    (3 channels).
    """
    images = np.asarray(images)
    if images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(f"images: expected [..., H, W, 3] RGB, got shape {images.shape}")
    if not weight >= 0 or not h_ref > 0:
        raise ValueError(f"weight/h_ref: expected weight >= 0 and h_ref > 0, got {weight}/{h_ref}")
    rgb = (
        images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    )
    if weight == 0:
        return rgb
    h = weight * np.clip(hematoxylin(images) / h_ref, 0.0, 1.0)
    return np.concatenate([rgb, h[..., None]], axis=-1)


def pixel_classes(classes: ArrayLike, *, block: int) -> np.ndarray:
    """``[..., h, w]`` block classes -> ``[..., h b, w b]`` per-pixel classes."""
    classes = np.asarray(classes)
    if classes.ndim < 2:
        raise ValueError(f"classes: expected rank >= 2 [..., h, w], got shape {classes.shape}")
    if block < 1:
        raise ValueError(f"block: expected a positive integer, got {block}")
    return np.repeat(np.repeat(classes, block, axis=-2), block, axis=-1)


# --------------------------------------------------------------------------- training


def train_epitome(
    key: ArrayLike,
    images: ArrayLike,
    *,
    size: int,
    steps: int,
    layers: int = 1,
    batch: int = 64,
    lr: float = 3e-3,
    sizes: Sequence[int] = PATCH_SIZES,
    quantile: float = 0.25,
    promotion: bool = True,
    init_var: float = 0.1,
    progress: Callable[[int, dict], None] | None = None,
) -> Epitome:
    """An epitome of H&E patches (paper Sec. 3 and 5.2) with :func:`epilsr.make_train_step`.

    Args:
      key: PRNG key (initialisation, patch sizes, patches).
      images: ``[T, H, W, C]`` float imagery (e.g. from :func:`stain_image`).
      size: epitome side ``N``.
      steps: SGD steps.
      layers: ``L``.
      batch: patches per step.
      lr: Adam learning rate.
      sizes: patch widths drawn uniformly per step (``11..31`` as in the paper).
      quantile: ``0.25`` = self-diversified (the worst quarter), ``1.0`` = non-diversified.
      promotion: location promotion.
      init_var: initial variance.
      progress: optional ``progress(step, {"loss": ..., "coverage": ...})`` callback.

    Returns:
      The trained :class:`Epitome` ``[L, N, N, C]``.
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
        raise ValueError(f"images: expected rank 4 [T, H, W, C], got shape {images.shape}")
    if steps < 1 or size < 1:
        raise ValueError(f"steps/size: expected positive integers, got {steps}/{size}")
    k_init, k_sizes, k_data = jax.random.split(key, 3)
    mean = jnp.mean(images, axis=(0, 1, 2))
    epitome = init_epitome(
        k_init, size=size, channels=images.shape[-1], layers=layers, mean=mean, var=init_var
    )
    optimizer = optax.adam(lr)
    step = make_train_step(optimizer=optimizer, quantile=quantile, promotion=promotion)
    state = train_init(k_data, epitome, optimizer)
    schedule = patch_sizes(k_sizes, num_steps=steps, sizes=sizes)
    for t, k in enumerate(schedule):
        patches = sample_patches(jax.random.fold_in(k_data, t), images, size=int(k), batch=batch)
        state, info = step(state, patches)
        if progress is not None:
            progress(t, {"loss": float(info.loss), "coverage": float(info.coverage)})
    return state.params


# --------------------------------------------------------------------------- embedding, LSR


def embed_coarse(
    key: ArrayLike,
    epitome: Epitome,
    images: ArrayLike,
    classes: ArrayLike,
    *,
    n_classes: int,
    n_patches: int,
    patch_size: int = 11,
    temperature: float | None = None,
    batch: int = 512,
) -> jax.Array:
    """Class counts of Eq. 11 from ``n_patches`` random patches (rounded up to batches).

    Args:
      key: PRNG key.
      epitome: :class:`Epitome` ``[L, N, N, C]``.
      images: ``[T, H, W, C]`` (same channels as the epitome).
      classes: ``[T, H, W]`` per-pixel coarse classes.
      n_classes: ``Cc``.
      n_patches: number of patches embedded.
      patch_size: ``K`` (11 in the paper).
      temperature: ``T``; ``None`` = ``K^2`` (per-pixel likelihood).

    Returns:
      ``[L, N, N, Cc]`` counts.
    """
    if n_patches < 1:
        raise ValueError(f"n_patches: expected a positive integer, got {n_patches}")
    temperature = float(patch_size**2) if temperature is None else temperature
    images = jnp.asarray(images, jnp.float32)
    classes = jnp.asarray(classes, jnp.int32)
    if images.ndim != 4 or classes.shape != images.shape[:3]:
        raise ValueError(
            f"classes: expected shape {images.shape[:3]} ([T, H, W]) for images {images.shape}, "
            f"got {classes.shape}"
        )
    counts = jnp.zeros((*epitome.prior_logits.shape, n_classes), jnp.float32)
    for i in range(-(-n_patches // batch)):
        counts = counts + _embed_batch(
            jax.random.fold_in(key, i),
            epitome,
            images,
            classes,
            temperature,
            n_classes=n_classes,
            patch_size=patch_size,
            batch=batch,
        )
    return counts


@functools.partial(jax.jit, static_argnames=("n_classes", "patch_size", "batch"))
def _embed_batch(key, epitome, images, classes, temperature, *, n_classes, patch_size, batch):
    patches, cls = sample_labelled_patches(key, images, classes, patch_size=patch_size,
                                           batch=batch)
    cls = cls[:, 0, 0]  # the class under each patch's centre
    return embed_classes(epitome, patches, cls, n_classes=n_classes, temperature=temperature)


def til_label_probs(
    class_counts: ArrayLike,
    label_given_class: ArrayLike,
    *,
    uniform_prior: bool = True,
    iters: int = 20,
) -> jax.Array:
    """``p(TIL | m, n)`` ``[L, N, N]`` by :func:`epilsr.super_resolve` (Eqs. 8-9).

    ``uniform_prior=True`` gives every class that occurs the same weight ``p(c)`` (the paper's
    uniform prior; classes with no embedded patch get none); ``False`` = observed proportions.
    ``label_given_class`` is ``[Cc, 2]`` (non-TIL, TIL).
    """
    counts = jnp.asarray(class_counts, jnp.float32)
    prior = None
    if uniform_prior:
        prior = (jnp.sum(counts.reshape(-1, counts.shape[-1]), axis=0) > 0).astype(jnp.float32)
    probs = super_resolve(counts, label_given_class, class_prior=prior, iters=iters)
    return probs[..., 1]


def box_smooth(label_probs: ArrayLike, *, size: int = 11) -> jax.Array:
    """Centred ``size x size`` circular mean over epitome positions: ``[L, N, N] -> [L, N, N]``.

    The paper's better variant (Sec. 5.2): the probability of TIL anywhere in a window.
    """
    q = jnp.asarray(label_probs, jnp.float32)
    if q.ndim != 3:
        raise ValueError(f"label_probs: expected rank 3 [L, N, N], got shape {q.shape}")
    if not 1 <= size <= min(q.shape[1:]):
        raise ValueError(f"size: expected 1 <= size <= {min(q.shape[1:])}, got {size}")
    s = box_sum(q, (size, size), axes=(1, 2)) / float(size * size)
    return jnp.roll(s, (size // 2, size // 2), axis=(1, 2))


def predict_til(
    epitome: Epitome,
    label_probs: ArrayLike,
    images: ArrayLike,
    *,
    patch_size: int = 11,
    temperature: float | None = None,
    stride: int = 4,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Dense scores (Eq. 2 via :func:`epilsr.predict`) for a stack of images.

    Args:
      epitome: :class:`Epitome` ``[L, N, N, C]``.
      label_probs: ``[L, N, N, n]`` any ``n`` per-position scores (e.g. several embeddings
        stacked); each output channel is the posterior-weighted mean of one of them.
      images: ``[T, H, W, C]``.
      patch_size: ``K``.
      temperature: ``T``; ``None`` = ``K^2``.
      stride: window spacing (``<= K``).
      progress: optional callback after each image.

    Returns:
      ``[T, H, W, n]`` float32.
    """
    temperature = float(patch_size**2) if temperature is None else temperature
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images: expected rank 4 [T, H, W, C], got shape {images.shape}")
    out = []
    for i, im in enumerate(images):
        out.append(
            np.asarray(
                _predict_image(
                    epitome, label_probs, im, temperature, patch_size=patch_size, stride=stride
                )
            )
        )
        if progress is not None:
            progress(i)
    return np.stack(out)


@functools.partial(jax.jit, static_argnames=("patch_size", "stride"))
def _predict_image(epitome, label_probs, image, temperature, *, patch_size, stride):
    return predict(
        epitome, label_probs, image, patch_size=patch_size, temperature=temperature, stride=stride
    )


def coarse_posterior(
    scores: ArrayLike, classes: ArrayLike, table: ArrayLike, *, block: int
) -> np.ndarray:
    """Combines pixel scores with the image's own coarse classes (the E-step of Eq. 9 per block).

    For a block of class ``c`` with table entry ``a = p(TIL | c)`` and mean score ``z`` over
    the block, a pixel with score ``q`` gets

        p = q a / z / (q a / z + (1 - q) (1 - a) / (1 - z)),

    i.e. the block's known composition redistributed over its pixels in proportion to the
    model's odds (within a block the ranking is unchanged).

    Args:
      scores: ``[..., H, W]`` in ``[0, 1]``.
      classes: ``[..., H/b, W/b]`` int block classes.
      table: ``[Cc, 2]`` ``p(l | c)``.
      block: ``b``.

    Returns:
      ``[..., H, W]`` float32.
    """
    q = np.clip(np.asarray(scores, np.float64), 1e-6, 1 - 1e-6)
    classes = np.asarray(classes)
    table = np.asarray(table, np.float64)
    if table.ndim != 2 or table.shape[1] != 2:
        raise ValueError(f"table: expected [Cc, 2], got shape {table.shape}")
    if (
        classes.shape[:-2] != q.shape[:-2]
        or tuple(s * block for s in classes.shape[-2:]) != q.shape[-2:]
    ):
        raise ValueError(
            f"classes: expected shape {q.shape[:-2] + (q.shape[-2] // block, q.shape[-1] // block)}"
            f" for scores {q.shape} and block {block}, got {classes.shape}"
        )
    a = table[:, 1] / table.sum(-1)
    h, w = classes.shape[-2:]
    z = q.reshape(*q.shape[:-2], h, block, w, block).mean(axis=(-3, -1))
    a_px = pixel_classes(np.clip(a[classes], 1e-6, 1 - 1e-6), block=block)
    z_px = pixel_classes(z, block=block)
    pos = q * a_px / z_px
    neg = (1 - q) * (1 - a_px) / (1 - z_px)
    return (pos / (pos + neg)).astype(np.float32)


def self_epitomic_til(
    key: ArrayLike, image: ArrayLike, classes: ArrayLike, table: ArrayLike, **kwargs
) -> jax.Array:
    """Self-epitomic LSR of one patch (:func:`epilsr.self_epitomic_lsr`): ``[H, W]`` p(TIL).

    ``classes`` are per-pixel ``[H, W]``; ``kwargs`` go to :func:`epilsr.self_epitomic_lsr`.
    """
    return self_epitomic_lsr(key, image, classes, table, **kwargs)[..., 1]


# --------------------------------------------------------------------------- evaluation


def nucleus_scores(scores: ArrayLike, instances: ArrayLike, ids: ArrayLike) -> np.ndarray:
    """Mean score over each nucleus's pixels: ``[H, W], [H, W], [M] -> [M]``."""
    scores, instances = np.asarray(scores, np.float64), np.asarray(instances)
    if scores.shape != instances.shape:
        raise ValueError(
            f"scores: expected shape {instances.shape} like instances, got {scores.shape}"
        )
    flat = instances.ravel().astype(np.int64)
    n = max(int(flat.max(initial=0)), int(np.max(ids, initial=0))) + 1
    total = np.bincount(flat, weights=scores.ravel(), minlength=n)
    area = np.bincount(flat, minlength=n)
    ids = np.asarray(ids, np.int64)
    if np.any(area[ids] == 0):
        raise ValueError("ids: some nuclei have no pixel in instances")
    return total[ids] / area[ids]


def nucleus_auc(labels: Sequence[ArrayLike], scores: Sequence[ArrayLike]) -> float:
    """ROC AUC over the nuclei of all patches (per-patch lists of ``[M_p]`` labels / scores)."""
    return metrics.roc_auc(np.concatenate(labels), np.concatenate(scores))


def pixel_auc(
    truth: ArrayLike, scores: ArrayLike, *, max_pixels: int | None = None, seed: int = 0
) -> float:
    """Pixel-level ROC AUC (``truth`` bool ``[...]``), on a random subset if ``max_pixels``."""
    t, s = np.asarray(truth).ravel(), np.asarray(scores).ravel()
    if t.shape != s.shape:
        raise ValueError(f"scores: expected {np.shape(truth)} like truth, got {np.shape(scores)}")
    if max_pixels is not None and t.size > max_pixels:
        idx = np.random.default_rng(seed).choice(t.size, max_pixels, replace=False)
        t, s = t[idx], s[idx]
    return metrics.roc_auc(t.astype(np.int8), s)


def bootstrap_auc(
    labels: Sequence[ArrayLike],
    scores: Sequence[ArrayLike],
    *,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`nucleus_auc`, resampling *patches*.

    Resamples without both classes are skipped. Returns ``(low, high)``.
    """
    if len(labels) != len(scores) or not labels:
        raise ValueError("labels/scores: expected two non-empty per-patch lists of equal length")
    if not 0 < level < 1:
        raise ValueError(f"level: expected a value in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    p = len(labels)
    lab = [np.asarray(x).astype(np.int8) for x in labels]
    sco = [np.asarray(x, np.float64) for x in scores]
    aucs = []
    for _ in range(n_boot):
        pick = rng.integers(0, p, p)
        y = np.concatenate([lab[i] for i in pick])
        if y.size == 0 or y.min() == y.max():
            continue
        aucs.append(metrics.roc_auc(y, np.concatenate([sco[i] for i in pick])))
    if not aucs:
        raise ValueError("labels: no bootstrap resample contains both classes")
    alpha = (1 - level) / 2
    lo, hi = np.quantile(aucs, [alpha, 1 - alpha])
    return float(lo), float(hi)
