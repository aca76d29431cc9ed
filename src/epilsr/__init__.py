"""epilsr: epitomes and epitomic label super-resolution in JAX.

Malkin, Ortiz & Jojic, "Mining self-similarity: label super-resolution with epitomic
representations". Pure functions on arrays and pytrees; callers ``jit``/``vmap``/shard them.
"""

import importlib

from epilsr import metrics
from epilsr.correlate import box_spread, box_sum, circular_correlate, circular_correlate_adjoint
from epilsr.embed import (
    embed_classes,
    embed_labels,
    label_probs_from_counts,
    spread_class_posteriors,
)
from epilsr.epitome import Epitome, clamp_epitome, epitome_from_image, init_epitome
from epilsr.likelihood import log_likelihood, log_posterior, log_prior
from epilsr.lsr import (
    adapt_compositions,
    dirichlet_concentration,
    lsr_objective,
    paint_classes,
    super_resolve,
)
from epilsr.parallel import make_sharded_train_step
from epilsr.predict import predict
from epilsr.self_epitomic import self_epitomic_counts, self_epitomic_lsr
from epilsr.train import (
    TrainInfo,
    TrainState,
    make_train_step,
    mixture,
    objective,
    train_init,
    train_step,
    worst_quantile,
)

# Names of the layers above the core (they need the ``io`` extra: tifffile, imagecodecs):
# imported on first use, so that ``import epilsr`` needs only jax, optax, numpy and chex.
_LAZY = {
    "checkpoint": ("epilsr.io.checkpoint", None),
    "embed_label_maps": ("epilsr.pipelines.embedding", "embed_label_maps"),
    "embed_class_maps": ("epilsr.pipelines.embedding", "embed_class_maps"),
    "all_tile_lsr": ("epilsr.pipelines.embedding", "all_tile_lsr"),
    "predict_raster": ("epilsr.pipelines.raster_predict", "predict_raster"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'epilsr' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "Epitome",
    "init_epitome",
    "epitome_from_image",
    "clamp_epitome",
    "log_likelihood",
    "log_prior",
    "log_posterior",
    "embed_labels",
    "embed_classes",
    "spread_class_posteriors",
    "super_resolve",
    "lsr_objective",
    "paint_classes",
    "self_epitomic_counts",
    "self_epitomic_lsr",
    "predict",
    "circular_correlate",
    "circular_correlate_adjoint",
    "box_sum",
    "box_spread",
    "TrainState",
    "TrainInfo",
    "train_init",
    "train_step",
    "objective",
    "make_train_step",
    "make_sharded_train_step",
    "worst_quantile",
    "mixture",
    "adapt_compositions",
    "dirichlet_concentration",
    "checkpoint",
    "metrics",
    "embed_label_maps",
    "embed_class_maps",
    "label_probs_from_counts",
    "all_tile_lsr",
    "predict_raster",
]
