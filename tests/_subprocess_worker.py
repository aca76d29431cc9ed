"""Subprocess entry points for the kill-and-resume and the 2-process ``jax.distributed`` tests.

Not collected by pytest. Usage::

    python tests/_subprocess_worker.py train --ckpt-dir D --out F --steps N --every K [--sleep S]
    python tests/_subprocess_worker.py distributed --process-id I --num-processes P --port Q \
        --out F

``train``: trains a tiny epitome with step-indexed randomness (``fold_in(key, step)``),
resuming from the latest checkpoint in ``D`` if there is one, checkpointing every ``K`` steps;
prints ``START <step>`` and ``CKPT <step>`` lines; saves the final state to ``F``.

``distributed``: joins a ``P``-process run on 127.0.0.1, takes 3 data-parallel steps on a
global batch split across processes (each process feeds its own rows), and saves the final
state to ``F``. The tests compare both against a single process.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

TRAIN_BATCH = 8
DIST_BATCH = 16
DIST_STEPS = 3


def smooth_image(seed: int = 0, size: int = 32, c: int = 2) -> np.ndarray:
    img = np.random.default_rng(seed).uniform(size=(size, size, c))
    out = sum(np.roll(img, (i, j), axis=(0, 1)) for i in range(3) for j in range(3))
    return (out / 9).astype(np.float32)


def initial_state(optimizer):
    import jax

    from epilsr import init_epitome
    from epilsr.train import train_init

    epitome = init_epitome(jax.random.key(1), size=8, channels=2)
    return train_init(jax.random.key(0), epitome, optimizer)


def distributed_batches() -> list[np.ndarray]:
    """The global batches of the distributed test (identical in every process)."""
    rng = np.random.default_rng(123)
    return [rng.uniform(size=(DIST_BATCH, 3, 3, 2)).astype(np.float32) for _ in range(DIST_STEPS)]


def distributed_optimizer():
    import optax

    # SGD: linear in the gradient, so cross-device reduction order stays at float32 noise
    # (Adam's first steps amplify the sign of near-zero gradients).
    return optax.sgd(1e-3)


DIST_HYPER = dict(temperature=1.0, quantile=0.25, promotion_threshold=0.05)


def run_train(args) -> None:
    import jax
    import optax

    from epilsr.io import checkpoint
    from epilsr.samplers import patch_sizes, sample_patches
    from epilsr.train import make_train_step, step_key

    optimizer = optax.adam(1e-2)
    state = initial_state(optimizer)
    path = checkpoint.latest(args.ckpt_dir)
    if path is not None:
        state = checkpoint.restore(path, state)
    print("START", int(state.step), flush=True)
    image = smooth_image()
    step = make_train_step(optimizer=optimizer, quantile=0.5)
    sample = jax.jit(sample_patches, static_argnames=("size", "batch"))
    while int(state.step) < args.steps:
        key = step_key(state)
        size = int(patch_sizes(jax.random.fold_in(key, 1), num_steps=1, sizes=(3, 5))[0])
        patches = sample(jax.random.fold_in(key, 0), image, size=size, batch=TRAIN_BATCH)
        state, _ = step(state, patches)
        done = int(state.step)
        if done % args.every == 0:
            checkpoint.save(checkpoint.checkpoint_path(args.ckpt_dir, done), state)
            print("CKPT", done, flush=True)
        time.sleep(args.sleep)
    checkpoint.save(args.out, state)
    print("DONE", int(state.step), flush=True)


def run_distributed(args) -> None:
    from epilsr.parallel import initialize_distributed

    initialize_distributed(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)

    import jax

    from epilsr.io import checkpoint
    from epilsr.parallel import make_sharded_train_step, replicate, shard_batch

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    optimizer = distributed_optimizer()
    state = replicate(initial_state(optimizer), mesh)
    step = make_sharded_train_step(mesh, optimizer=optimizer, **DIST_HYPER)
    per_process = DIST_BATCH // jax.process_count()
    lo = jax.process_index() * per_process
    for batch in distributed_batches():
        state, info = step(state, shard_batch(batch[lo : lo + per_process], mesh))
    print(
        "DEVICES",
        jax.device_count(),
        "LOCAL",
        jax.local_device_count(),
        "PROCESS",
        jax.process_index(),
        flush=True,
    )
    checkpoint.save(args.out, state)
    print("DONE", flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("train")
    t.add_argument("--ckpt-dir", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--every", type=int, required=True)
    t.add_argument("--sleep", type=float, default=0.0)
    d = sub.add_parser("distributed")
    d.add_argument("--process-id", type=int, required=True)
    d.add_argument("--num-processes", type=int, required=True)
    d.add_argument("--port", type=int, required=True)
    d.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.mode == "train":
        run_train(args)
    else:
        run_distributed(args)


if __name__ == "__main__":
    main(sys.argv[1:])
