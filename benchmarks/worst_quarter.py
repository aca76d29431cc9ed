"""Mean and worst-quarter log-likelihood per pixel of the train_quality epitomes.

    python -m benchmarks.worst_quarter [results/train_quality ...]

Run after ``python -m benchmarks.train_quality``: loads ``<dir>/<setting>/epitome.npz`` and
scores a fixed set of 256 patches per size (K = 11, 21, 31; ``fold_in(key(777), K)``) drawn from
the real tiles; self-diversification targets the worst quarter.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import epilsr
from epilsr.data import chesapeake, samplers
from epilsr.io import checkpoint

SETTINGS = ("default", "no_promotion", "no_diversification", "neither")


def main(dirs: list[str]) -> None:
    root = chesapeake.data_root() / "chesapeake_wv"
    tiles = [chesapeake.load_tile(s) for s in chesapeake.find_tiles(root)]
    images = jnp.asarray(np.stack([t.image for t in tiles]), jnp.float32) / 255
    for d in dirs:
        for setting in SETTINGS:
            epitome = checkpoint.load_epitome(Path(d) / setting / "epitome.npz")
            cells = []
            for k in (11, 21, 31):
                key = jax.random.fold_in(jax.random.key(777), k)
                patches = samplers.sample_patches(key, images, size=k, batch=256)
                joint = epilsr.log_likelihood(epitome, patches) + epilsr.log_prior(epitome)
                ll = np.sort(np.asarray(jax.nn.logsumexp(joint, axis=(1, 2, 3)))) / (k * k)
                cells.append(
                    f"K{k}: mean {ll.mean():.3f} worst quarter {ll[: len(ll) // 4].mean():.3f}"
                )
            print(f"{d} {setting:19s} " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    here = Path(__file__).parent / "results"
    main(sys.argv[1:] or [str(here / "train_quality"), str(here / "train_quality_seed1")])
