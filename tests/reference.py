"""Slow float64 NumPy brute-force twins of the library, written straight from the paper.

Malkin, Ortiz & Jojic, "Mining self-similarity: label super-resolution with epitomic
representations" (ECCV 2020). Every function loops explicitly over epitome positions
``s = (l, s1, s2)`` (the ``K x K`` window with top-left corner ``(s1, s2)`` of layer ``l``,
indices modulo ``N``). No FFT, no convolution, nothing imported from ``epilsr``.
Batch/patch axes are vectorised inside the position loops to keep the tests fast.
"""

from __future__ import annotations

import math

import numpy as np

LOG_2PI = math.log(2.0 * math.pi)


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _window_index(s1: int, s2: int, k1: int, k2: int, n1: int, n2: int):
    """Row/column index grids of the wrap-around window with top-left corner ``(s1, s2)``."""
    rows = (s1 + np.arange(k1)) % n1
    cols = (s2 + np.arange(k2)) % n2
    return np.ix_(rows, cols)


def _logsumexp(x: np.ndarray, axis) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


# --------------------------------------------------------------------------- correlation


def circular_correlate_bf(maps, kernels) -> np.ndarray:
    """``out[b, l, s1, s2] = sum_{i, j, f} maps[l, s1+i, s2+j, f] kernels[b, i, j, f]`` (mod N)."""
    maps, kernels = _f64(maps), _f64(kernels)
    n_layers, n1, n2, _ = maps.shape
    b, k1, k2, _ = kernels.shape
    out = np.zeros((b, n_layers, n1, n2))
    for l in range(n_layers):
        for s1 in range(n1):
            for s2 in range(n2):
                win = maps[l][_window_index(s1, s2, k1, k2, n1, n2)]  # [K1, K2, F]
                out[:, l, s1, s2] = np.einsum("ijf,bijf->b", win, kernels)
    return out


def box_sum_bf(x, size) -> np.ndarray:
    """``out[..., s1, s2] = sum_{i<K1, j<K2} x[..., s1+i, s2+j]`` over the last two axes."""
    x = _f64(x)
    n1, n2 = x.shape[-2:]
    out = np.zeros_like(x)
    for s1 in range(n1):
        for s2 in range(n2):
            for i in range(size[0]):
                for j in range(size[1]):
                    out[..., s1, s2] += x[..., (s1 + i) % n1, (s2 + j) % n2]
    return out


def box_spread_bf(x, size) -> np.ndarray:
    """Every position's value added to each pixel of its window (last two axes)."""
    x = _f64(x)
    n1, n2 = x.shape[-2:]
    out = np.zeros_like(x)
    for s1 in range(n1):
        for s2 in range(n2):
            for i in range(size[0]):
                for j in range(size[1]):
                    out[..., (s1 + i) % n1, (s2 + j) % n2] += x[..., s1, s2]
    return out


# --------------------------------------------------------------------------- likelihood (Eq. 3)


def log_likelihood_bf(mean, log_var, patches) -> np.ndarray:
    """Eq. 3: ``log p(x|s) = sum_{i,j,k} log N(x_ijk; mu_{s+(i,j),k}, sigma^2_{s+(i,j),k})``.

    Args:
      mean, log_var: ``[L, N1, N2, C]``.
      patches: ``[B, K1, K2, C]``.

    Returns:
      ``[B, L, N1, N2]``.
    """
    mean, log_var, x = _f64(mean), _f64(log_var), _f64(patches)
    n_layers, n1, n2, _ = mean.shape
    b, k1, k2, _ = x.shape
    out = np.zeros((b, n_layers, n1, n2))
    for l in range(n_layers):
        for s1 in range(n1):
            for s2 in range(n2):
                idx = _window_index(s1, s2, k1, k2, n1, n2)
                mu = mean[l][idx][None]  # [1, K1, K2, C]
                lv = log_var[l][idx][None]
                per_elem = -0.5 * ((x - mu) ** 2 / np.exp(lv) + lv + LOG_2PI)
                out[:, l, s1, s2] = per_elem.sum(axis=(1, 2, 3))
    return out


def log_prior_bf(prior_logits) -> np.ndarray:
    """``log p(s)``: softmax over all ``L*N1*N2`` positions jointly."""
    logits = _f64(prior_logits)
    return logits - _logsumexp(logits.reshape(-1), axis=0)[0]


def log_posterior_bf(mean, log_var, prior_logits, patches, temperature=1.0, mask=None, *,
                     loglik=None):
    """``log p(s|x) = log p(x|s)/T + log p(s) - log Z``; masked positions ``-inf``.

    ``loglik`` optionally passes a precomputed :func:`log_likelihood_bf` (saves the loops).
    Returns ``[B, L, N1, N2]`` normalised over all positions jointly.
    """
    if loglik is None:
        loglik = log_likelihood_bf(mean, log_var, patches)
    logits = _f64(loglik) / float(temperature)
    logits = logits + log_prior_bf(prior_logits)[None]
    if mask is not None:
        logits = np.where(np.asarray(mask, bool)[None], logits, -np.inf)
    return logits - _logsumexp(logits, axis=(1, 2, 3))


def posterior_bf(mean, log_var, prior_logits, patches, temperature=1.0, mask=None, *,
                 loglik=None):
    return np.exp(
        log_posterior_bf(mean, log_var, prior_logits, patches, temperature, mask, loglik=loglik)
    )


# --------------------------------------------------------------------------- embeddings


def embed_labels_bf(mean, log_var, prior_logits, patches, labels, temperature, mask=None):
    """Eq. 6 with the label block centred in the patch.

    ``z[l, m, n, :] = sum_b sum_s p(s|x_b) y_b[m - s1 - o1, n - s2 - o2, :]`` with
    ``o = (K - Kl) // 2``: label pixel ``(i, j)`` lands on ``(s1 + o1 + i, s2 + o2 + j)`` mod N.

    Returns ``[L, N1, N2, n]``.
    """
    post = posterior_bf(mean, log_var, prior_logits, patches, temperature, mask)
    labels = _f64(labels)
    n_layers, n1, n2 = post.shape[1:]
    k1, k2 = np.shape(patches)[1:3]
    kl1, kl2, n = labels.shape[1:]
    o1, o2 = (k1 - kl1) // 2, (k2 - kl2) // 2
    z = np.zeros((n_layers, n1, n2, n))
    for l in range(n_layers):
        for s1 in range(n1):
            for s2 in range(n2):
                idx = _window_index(s1 + o1, s2 + o2, kl1, kl2, n1, n2)
                block = np.einsum("b,bijn->ijn", post[:, l, s1, s2], labels)
                z[l][idx] += block  # window indices are distinct (Kl <= N), so += is safe
    return z


def embed_classes_bf(mean, log_var, prior_logits, patches, classes, n_classes, temperature,
                     mask=None):
    """Eq. 11: every pixel of window ``s`` receives ``p(s|x)`` for ``x``'s class.

    Returns ``[L, N1, N2, Cc]``.
    """
    post = posterior_bf(mean, log_var, prior_logits, patches, temperature, mask)
    classes = np.asarray(classes)
    n_layers, n1, n2 = post.shape[1:]
    k1, k2 = np.shape(patches)[1:3]
    z = np.zeros((n_layers, n1, n2, n_classes))
    for l in range(n_layers):
        for s1 in range(n1):
            for s2 in range(n2):
                idx = _window_index(s1, s2, k1, k2, n1, n2)
                for b in range(post.shape[0]):
                    z[l][idx + (classes[b],)] += post[b, l, s1, s2]
    return z


# --------------------------------------------------------------------------- LSR EM (Eqs. 7-9)


def _em_setup(class_counts, label_given_class, class_prior):
    counts = _f64(class_counts)
    n_classes = counts.shape[-1]
    flat = counts.reshape(-1, n_classes)  # [S, Cc]
    n_pos = flat.shape[0]
    p_s_given_c = np.empty_like(flat)
    for c in range(n_classes):
        total = flat[:, c].sum()
        p_s_given_c[:, c] = flat[:, c] / total if total > 0 else 1.0 / n_pos
    table = _f64(label_given_class)
    rows = table.sum(axis=1, keepdims=True)
    table = np.where(rows > 0, table / np.where(rows > 0, rows, 1.0), 1.0 / table.shape[1])
    if class_prior is None:
        mass = flat.sum(axis=0)
        prior = mass / mass.sum()
    else:
        prior = _f64(class_prior)
        prior = prior / prior.sum()
    return counts.shape[:-1], p_s_given_c, table, prior


def super_resolve_bf(class_counts, label_given_class, class_prior=None, iters=20):
    """EM of Eqs. 8-9 with the explicit ``q_{l,c}(s)`` tensor ``[Cc, n, S]``.

    E-step (Eq. 8): ``q_{l,c}(s) = p(l|s) p(s|c) / sum_s' p(l|s') p(s'|c)``.
    M-step (Eq. 9): ``p(l|s) ∝ sum_c p(c) p(l|c) q_{l,c}(s)``.
    Start: uniform ``p(l|s)``. Positions that receive no mass stay uniform.

    Returns ``[..., n]``.
    """
    shape, p_sc, table, prior = _em_setup(class_counts, label_given_class, class_prior)
    n_pos, n_classes = p_sc.shape
    n = table.shape[1]
    q = np.full((n_pos, n), 1.0 / n)
    for _ in range(iters):
        q_lcs = np.zeros((n_classes, n, n_pos))
        for c in range(n_classes):
            for lab in range(n):
                joint = q[:, lab] * p_sc[:, c]
                z = joint.sum()
                if z > 0:
                    q_lcs[c, lab] = joint / z
        new = np.zeros((n_pos, n))
        for s in range(n_pos):
            for lab in range(n):
                new[s, lab] = sum(
                    prior[c] * table[c, lab] * q_lcs[c, lab, s] for c in range(n_classes)
                )
        sums = new.sum(axis=1, keepdims=True)
        q = np.where(sums > 0, new / np.where(sums > 0, sums, 1.0), 1.0 / n)
    return q.reshape(*shape, n)


def lsr_objective_bf(class_counts, label_given_class, label_probs, class_prior=None) -> float:
    """Eq. 7: ``sum_c p(c) sum_l p(l|c) log sum_s p(l|s) p(s|c)``."""
    _, p_sc, table, prior = _em_setup(class_counts, label_given_class, class_prior)
    q = _f64(label_probs).reshape(p_sc.shape[0], -1)
    total = 0.0
    for c in range(p_sc.shape[1]):
        for lab in range(q.shape[1]):
            w = prior[c] * table[c, lab]
            if w > 0:
                total += w * math.log(sum(q[s, lab] * p_sc[s, c] for s in range(q.shape[0])))
    return total


# --------------------------------------------------------------------------- prediction (Eq. 2)


def predict_bf(mean, log_var, prior_logits, label_probs, image, patch_size, temperature,
               mask=None):
    """Eq. 2 over every ``K x K`` window of the image at stride 1.

    Window ``x`` with top-left ``(r, c)`` predicts ``sum_s p(s|x) p(l | s + u)`` for its pixel
    ``(r, c) + u``; a pixel's output is the mean over the windows covering it.

    Returns ``[H, W, n]``.
    """
    image = _f64(image)
    label_probs = _f64(label_probs)
    h, w, _ = image.shape
    k = patch_size
    starts = [(r, c) for r in range(h - k + 1) for c in range(w - k + 1)]
    patches = np.stack([image[r:r + k, c:c + k] for r, c in starts])
    post = posterior_bf(mean, log_var, prior_logits, patches, temperature, mask)  # [B, L, N, N]
    n_layers, n1, n2, n = label_probs.shape
    y = np.zeros((len(starts), k, k, n))
    for l in range(n_layers):
        for s1 in range(n1):
            for s2 in range(n2):
                block = label_probs[l][_window_index(s1, s2, k, k, n1, n2)]  # [K, K, n]
                y += post[:, l, s1, s2, None, None, None] * block[None]
    acc = np.zeros((h, w, n))
    count = np.zeros((h, w))
    for b, (r, c) in enumerate(starts):
        acc[r:r + k, c:c + k] += y[b]
        count[r:r + k, c:c + k] += 1
    return acc / count[..., None]


# --------------------------------------------------------------------------- test data


def random_epitome_arrays(rng: np.random.Generator, n_layers: int, n1: int, n2: int, c: int,
                          *, flat_prior: bool = False):
    """``(mean, log_var, prior_logits)`` float32.

    Means U[0, 1], variances log-uniform in [0.01, 1], prior logits N(0, 1) (or flat).
    """
    mean = rng.uniform(0.0, 1.0, size=(n_layers, n1, n2, c))
    log_var = rng.uniform(math.log(0.01), 0.0, size=(n_layers, n1, n2, c))
    prior = np.zeros((n_layers, n1, n2)) if flat_prior else rng.normal(size=(n_layers, n1, n2))
    return mean.astype(np.float32), log_var.astype(np.float32), prior.astype(np.float32)


def cut_patches(rng: np.random.Generator, mean, b: int, k1: int, k2: int, noise: float = 0.02):
    """``b`` wrap-around windows of ``mean`` at random positions plus Gaussian noise. float32."""
    mean = _f64(mean)
    n_layers, n1, n2, _ = mean.shape
    out = []
    for _ in range(b):
        l, s1, s2 = rng.integers(n_layers), rng.integers(n1), rng.integers(n2)
        out.append(mean[l][_window_index(s1, s2, k1, k2, n1, n2)])
    patches = np.stack(out) + noise * rng.normal(size=(b, k1, k2, mean.shape[-1]))
    return patches.astype(np.float32)
