"""End-to-end accuracy of self-epitomic LSR: the demo scene and the real West-Virginia tiles.

These are the numbers the README reports; they fail if a change makes the method worse.
"""

from __future__ import annotations

import jax
import numpy as np

import epilsr
from epilsr import metrics
from epilsr.data import chesapeake, synthetic
from epilsr.metrics import NODATA_LABEL


def test_demo_scene_beats_paint_baseline():
    for seed in (0, 1):
        scene = synthetic.make_scene(seed, size=256, block=32)
        probs = epilsr.self_epitomic_lsr(
            jax.random.key(seed), scene.image, scene.classes, scene.label_given_class, cell_size=32
        )
        lsr = metrics.accuracy(scene.labels, np.asarray(probs).argmax(-1))
        paint = metrics.accuracy(
            scene.labels,
            np.asarray(epilsr.paint_classes(scene.classes, scene.label_given_class)).argmax(-1),
        )
        assert lsr > paint + 0.05, (seed, lsr, paint)


def test_real_tiles_pooled_accuracy(data_root):
    """Default settings on the 8 real tiles: pooled accuracy >= 0.88, mIoU above painting."""
    table = chesapeake.load_nlcd_table(data_root / "chesapeake_wv" / "nlcd_label_priors.csv")
    cm_lsr = np.zeros((4, 4), np.int64)
    cm_paint = np.zeros((4, 4), np.int64)
    for i, stem in enumerate(chesapeake.find_tiles(data_root / "chesapeake_wv")):
        tile = chesapeake.load_tile(stem)
        classes = table.index(tile.nlcd)
        probs = epilsr.self_epitomic_lsr(jax.random.key(i), tile.image, classes, table.mean)
        probs = np.asarray(probs)
        assert np.all(np.isfinite(probs))
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)
        cm_lsr += metrics.confusion_matrix(
            tile.labels, probs.argmax(-1), n_classes=4, ignore=NODATA_LABEL
        )
        paint = np.asarray(epilsr.paint_classes(classes, table.mean)).argmax(-1)
        cm_paint += metrics.confusion_matrix(
            tile.labels, paint, n_classes=4, ignore=NODATA_LABEL
        )
    acc = metrics.accuracy_from_confusion(cm_lsr)
    _, miou = metrics.iou_from_confusion(cm_lsr)
    _, miou_paint = metrics.iou_from_confusion(cm_paint)
    assert abs(metrics.accuracy_from_confusion(cm_paint) - 0.856) < 0.002
    assert acc >= 0.88, acc
    assert miou > miou_paint + 0.03, (miou, miou_paint)
