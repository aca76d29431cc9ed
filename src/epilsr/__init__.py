"""epilsr: epitomes and epitomic label super-resolution in JAX.

Malkin, Ortiz & Jojic, "Mining self-similarity: label super-resolution with epitomic
representations". Pure functions on arrays and pytrees; callers ``jit``/``vmap``/shard them.
"""

from epilsr import checkpoint, metrics, segment, til, tiling
from epilsr.correlate import box_spread, box_sum, circular_correlate, circular_correlate_adjoint
from epilsr.embed import embed_classes, embed_labels, spread_class_posteriors
from epilsr.epitome import Epitome, clamp_epitome, epitome_from_image, init_epitome
from epilsr.likelihood import log_likelihood, log_posterior, log_prior
from epilsr.lsr import (
    adapt_compositions,
    dirichlet_concentration,
    lsr_objective,
    paint_classes,
    self_epitomic_counts,
    self_epitomic_lsr,
    super_resolve,
)
from epilsr.predict import predict
from epilsr.segment import (
    all_tile_lsr,
    embed_class_maps,
    embed_label_maps,
    label_probs_from_counts,
    predict_raster,
)
from epilsr.train import (
    TrainInfo,
    TrainState,
    make_sharded_train_step,
    make_train_step,
    mixture,
    objective,
    train_init,
    train_step,
    worst_quantile,
)

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
    "tiling",
    "segment",
    "til",
    "embed_label_maps",
    "embed_class_maps",
    "label_probs_from_counts",
    "all_tile_lsr",
    "predict_raster",
]
