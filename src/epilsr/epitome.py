"""The epitome: a mixture of ``L`` toroidal ``N x N`` Gaussian epitomes (paper Eqs. 3-4).

Parameters live in an immutable pytree, :class:`Epitome`:

* ``mean``          ``[L, N, N, C]``  the per-pixel means ``mu``
* ``log_var``       ``[L, N, N, C]``  the per-pixel log-variances ``log sigma^2``
* ``prior_logits``  ``[L, N, N]``     ``p(s) = softmax(prior_logits)`` over all ``L*N*N`` positions

A position ``s = (l, s1, s2)`` names the ``K x K`` window whose top-left corner is
``(s1, s2)`` of layer ``l``; indices wrap modulo ``N`` (Eq. 4).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from epilsr._validate import check_finite, check_rank

__all__ = [
    "Epitome",
    "init_epitome",
    "epitome_from_image",
    "clamp_epitome",
    "LOG_VAR_MIN",
    "LOG_VAR_MAX",
    "PRIOR_LOGIT_BOUND",
]

#: Variance bounds of the original implementation: sigma^2 in [0.01, 1].
LOG_VAR_MIN = math.log(0.01)
LOG_VAR_MAX = 0.0
#: Prior logits are centred and clamped to [-4, 4] after each training step.
PRIOR_LOGIT_BOUND = 4.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Epitome:
    """Epitome parameters (a pytree; every field is a leaf).

    Attributes:
      mean: ``[L, N, N, C]`` means.
      log_var: ``[L, N, N, C]`` log-variances.
      prior_logits: ``[L, N, N]`` unnormalised log-prior over positions.
    """

    mean: jax.Array
    log_var: jax.Array
    prior_logits: jax.Array

    @property
    def layers(self) -> int:
        return self.mean.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        """Spatial size ``(N1, N2)``; rectangular epitomes are supported."""
        return self.mean.shape[1], self.mean.shape[2]

    @property
    def channels(self) -> int:
        return self.mean.shape[3]

    def check(self) -> Epitome:
        """Validates ranks and matching shapes (trace-time); returns ``self``."""
        check_rank("epitome.mean", self.mean, 4, "[L, N, N, C]")
        if self.log_var.shape != self.mean.shape:
            raise ValueError(
                f"epitome.log_var: expected shape {self.mean.shape} (same as mean), "
                f"got {self.log_var.shape}"
            )
        if self.prior_logits.shape != self.mean.shape[:3]:
            raise ValueError(
                f"epitome.prior_logits: expected shape {self.mean.shape[:3]} ([L, N, N]), "
                f"got {self.prior_logits.shape}"
            )
        return self


def init_epitome(
    key: ArrayLike,
    *,
    size: int | tuple[int, int],
    channels: int,
    layers: int = 1,
    mean: float | ArrayLike = 0.5,
    mean_scale: float = 0.1,
    var: float = 0.1,
) -> Epitome:
    """Random initialisation: means ``mean + mean_scale * N(0, 1)``, constant variance.

    Args:
      key: PRNG key.
      size: ``N`` or ``(N1, N2)``.
      channels: ``C``.
      layers: ``L``.
      mean: centre of the means (scalar or ``[C]``, e.g. the data's channel means).
      mean_scale: standard deviation of the random means.
      var: initial variance, within ``[0.01, 1]``.

    Returns:
      An :class:`Epitome` with a flat prior.
    """
    n1, n2 = (size, size) if isinstance(size, int) else size
    if min(n1, n2, channels, layers) < 1:
        raise ValueError(
            f"init_epitome: size, channels and layers must be >= 1, got size={size}, "
            f"channels={channels}, layers={layers}"
        )
    if not 0.01 <= var <= 1.0:
        raise ValueError(f"var: expected a variance in [0.01, 1], got {var}")
    shape = (layers, n1, n2, channels)
    mu = jnp.asarray(mean, jnp.float32) + mean_scale * jax.random.normal(key, shape)
    return Epitome(
        mean=mu.astype(jnp.float32),
        log_var=jnp.full(shape, jnp.log(var), jnp.float32),
        prior_logits=jnp.zeros(shape[:3], jnp.float32),
    )


def as_float_image(image: ArrayLike, name: str = "image") -> jax.Array:
    """``[H, W, C]`` image as float32; uint8 is scaled by 1/255, uint16 by 1/65535."""
    image = jnp.asarray(image)
    check_rank(name, image, 3, "[H, W, C]")
    if image.dtype == jnp.uint8:
        return image.astype(jnp.float32) / 255.0
    if image.dtype == jnp.uint16:
        return image.astype(jnp.float32) / 65535.0
    if not jnp.issubdtype(image.dtype, jnp.floating):
        raise ValueError(
            f"{name}: expected uint8, uint16 or float imagery, got dtype {image.dtype}"
        )
    return image.astype(jnp.float32)


def check_image(image: ArrayLike, name: str = "image") -> jax.Array | np.ndarray:
    """Checks an ``[H, W, C]`` image without converting it (that is compiled, by
    :func:`as_float_image` inside the caller's jitted body): rank, dtype (uint8, uint16 or
    float) and, on concrete float values, finiteness (on the host). Returns it as an array."""
    if not isinstance(image, np.ndarray | jax.Array):
        image = np.asarray(image)
    check_rank(name, image, 3, "[H, W, C]")
    if image.dtype not in (np.uint8, np.uint16) and not jnp.issubdtype(image.dtype, jnp.floating):
        raise ValueError(
            f"{name}: expected uint8, uint16 or float imagery, got dtype {image.dtype}"
        )
    check_finite(name, image)
    return image


def epitome_from_image(image: ArrayLike, *, var: float = 0.01) -> Epitome:
    """The image itself as a one-layer ``H x W`` epitome with a flat prior (Sec. 5.1).

    Args:
      image: ``[H, W, C]``; uint8/uint16 are scaled to ``[0, 1]``. ``H != W`` is allowed.
      var: the fixed variance ``sigma^2`` of every pixel.

    Returns:
      An :class:`Epitome` with ``mean [1, H, W, C]``.
    """
    image = as_float_image(image)
    check_finite("image", image)
    if not var > 0:
        raise ValueError(f"var: expected a positive variance, got {var}")
    mean = image[None]
    return Epitome(
        mean=mean,
        log_var=jnp.full(mean.shape, jnp.log(var), jnp.float32),
        prior_logits=jnp.zeros(mean.shape[:3], jnp.float32),
    )


def clamp_epitome(epitome: Epitome) -> Epitome:
    """Constraints applied after each training step (DESIGN.md Sec. 5).

    Variances are clamped to ``[0.01, 1]``; prior logits are centred and clamped to ``[-4, 4]``.
    """
    logits = epitome.prior_logits - jnp.mean(epitome.prior_logits)
    return Epitome(
        mean=epitome.mean,
        log_var=jnp.clip(epitome.log_var, LOG_VAR_MIN, LOG_VAR_MAX),
        prior_logits=jnp.clip(logits, -PRIOR_LOGIT_BOUND, PRIOR_LOGIT_BOUND),
    )
