"""Library input checks of issue 18: companion rasters on the imagery's grid, never cropped."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from epilsr import self_epitomic_lsr
from epilsr._validate import check_same_grid


def test_larger_class_raster_is_refused_by_self_epitomic_lsr():
    image = np.random.default_rng(0).uniform(size=(12, 12, 3)).astype(np.float32)
    classes = np.zeros((14, 12), np.int32)  # two extra rows: once cropped to the top-left
    with pytest.raises(ValueError, match=r"classes: expected shape \(12, 12\)"):
        self_epitomic_lsr(jax.random.key(0), image, classes, np.eye(2), patch_size=3)


@pytest.mark.parametrize("shape", [(14, 12), (12, 11), (14, 12, 1)])
def test_check_same_grid_refuses_other_sizes(shape):
    with pytest.raises(ValueError, match=r"classes: expected a 12x12 raster matching the image, "
                                         r"got \d+x\d+ \(rasters are never cropped"):
        check_same_grid("classes", shape, 12, 12)


def test_check_same_grid_accepts_the_grid_and_unknown_shapes():
    check_same_grid("classes", (12, 12), 12, 12)
    check_same_grid("valid", (12, 12, 1), 12, 12)
    check_same_grid("classes", None, 12, 12)  # a reader without .shape: checked per window
