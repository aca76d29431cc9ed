"""Data parallelism: device meshes, the sharded train step (jit + shard_map), multi-host start,
the CPU split into devices."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from epilsr.epitome import Epitome
from epilsr.likelihood import log_likelihood
from epilsr.train import TrainState, _step_with_reference

__all__ = [
    "data_mesh",
    "make_sharded_train_step",
    "shard_batch",
    "replicate",
    "initialize_distributed",
    "use_cpu_devices",
    "sum_over_shards",
]


def _auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with ``AxisType.Auto`` axes (GSPMD propagation).

    ``jax.make_mesh`` defaults to ``Explicit`` axes, under which the convolution inside the
    likelihood would need explicit output shardings.
    """
    if "data" not in mesh.axis_names:
        raise ValueError(f"mesh: expected an axis named 'data', got axes {mesh.axis_names}")
    auto = (AxisType.Auto,) * len(mesh.axis_names)
    if tuple(mesh.axis_types) == auto:
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def sum_over_shards(fn, mesh: Mesh, n_replicated: int):
    """``fn(*replicated, *split)`` on every device of ``mesh``: the first ``n_replicated``
    arguments whole, the others' leading axis divided over the axis ``"data"``; the devices'
    outputs (a pytree) summed by one ``psum`` and returned replicated (``jax.shard_map``).

    Runs without varying-type checks (``check_vma=False``): ``fn`` may take a VJP in a
    replicated argument (the label embeddings' adjoint correlation), which under those checks
    would already be summed over the devices; here each device's output is its own and the one
    ``psum`` adds them.
    """

    def local(*args):
        return jax.tree.map(lambda x: jax.lax.psum(x, "data"), fn(*args))

    def call(*args):
        specs = ((PartitionSpec(),) * n_replicated
                 + (PartitionSpec("data"),) * (len(args) - n_replicated))
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(),
                             check_vma=False)(*args)

    return call


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D ``Auto`` mesh named ``"data"`` over ``devices`` (default: all, every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("data",), axis_types=(AxisType.Auto,))


def _sharded_log_likelihood(mesh: Mesh):
    """:func:`epilsr.log_likelihood` as a ``shard_map`` over the mesh axis ``"data"``.

    Each device correlates its own patches with the (replicated) epitome, so the transform
    routes stay data-parallel instead of GSPMD gathering the batch around them. The epitome
    enters unvarying (``P()``); under ``check_vma`` the transpose of that broadcast is a
    ``psum`` over ``"data"``, so the gradient is the exact sum over the global batch.
    """

    def loglik(epitome: Epitome, patches: jax.Array, *, route: str = "auto") -> jax.Array:
        fn = jax.shard_map(
            functools.partial(log_likelihood, route=route),
            mesh=mesh,
            in_specs=(PartitionSpec(), PartitionSpec("data")),
            out_specs=PartitionSpec("data"),
        )
        return fn(epitome, patches)

    return loglik


def make_sharded_train_step(mesh: Mesh, *, optimizer: optax.GradientTransformation, **hyper):
    """Data-parallel :func:`train_step` over the 1-D mesh axis ``"data"``.

    The per-example likelihood (the correlation routes) runs under ``jax.shard_map`` over
    ``"data"`` (each device transforms and correlates its own patches against the replicated
    epitome; the epitome's gradient is ``psum``-ed); the rest of the step is partitioned by
    GSPMD.

    The returned ``step(state, patches, reference=None) -> (state, info)`` (a thin wrapper
    over the jitted function, exposed with ``lower`` as ``step.jitted``) takes
    ``patches [B, K, K, C]`` sharded ``NamedSharding(mesh, P("data"))`` (``B`` divisible by the
    axis size) and replicates the state, the reference and the outputs. The compiler inserts
    the all-reduces of the gradient and of the counter increments; the worst quantile is chosen
    over the global batch, so the result equals the single-device step on the same batch (up
    to float32 reduction order). With several processes, build global inputs with
    :func:`shard_batch` and :func:`replicate`. Mesh axes are used as ``AxisType.Auto``
    (:func:`data_mesh` builds such a mesh; ``jax.make_mesh`` meshes are converted).
    """
    mesh = _auto_mesh(mesh)
    if "reference" in hyper:
        raise ValueError("reference: pass it to the returned step, not as a static hyperparameter")
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = NamedSharding(mesh, PartitionSpec("data"))
    fn = functools.partial(
        _step_with_reference, optimizer=optimizer, loglik=_sharded_log_likelihood(mesh), **hyper
    )
    jitted = jax.jit(
        fn,
        in_shardings=(replicated, batch, replicated),
        out_shardings=(replicated, replicated),
    )

    def step(state: TrainState, patches: ArrayLike, reference: Epitome | None = None):
        return jitted(state, patches, reference)

    step.lower = lambda state, patches, reference=None: jitted.lower(state, patches, reference)
    step.jitted = jitted
    return step


def shard_batch(patches: ArrayLike, mesh: Mesh) -> jax.Array:
    """This process's ``[B_local, K, K, C]`` patches as a global array sharded over ``"data"``.

    The global batch is the concatenation of the processes' local batches in process order.
    """
    sharding = NamedSharding(_auto_mesh(mesh), PartitionSpec("data"))
    return jax.make_array_from_process_local_data(sharding, np.asarray(patches))


def replicate(tree, mesh: Mesh):
    """Replicates a pytree (e.g. a :class:`TrainState`) on every device of ``mesh``.

    Every process must pass the same values (e.g. built from the same seed or restored from the
    same checkpoint). Typed PRNG keys are supported.
    """
    sharding = NamedSharding(_auto_mesh(mesh), PartitionSpec())

    def put(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = put(np.asarray(jax.random.key_data(x)))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, tree)


def initialize_distributed(
    coordinator: str | None, num_processes: int, process_id: int, **kwargs
) -> int:
    """Joins a multi-process run: thin wrapper on :func:`jax.distributed.initialize`.

    Does nothing when ``num_processes <= 1``. On CPU the collectives go through gloo (JAX's
    default in recent versions; set here if it is ``"none"``). Must run before any other JAX
    call that touches a device.

    Args:
      coordinator: ``"host:port"`` of process 0.
      num_processes: number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      **kwargs: passed to ``jax.distributed.initialize`` (e.g. ``local_device_ids``).

    Returns:
      ``jax.process_index()`` after initialisation (0 for a single process).
    """
    if num_processes <= 1:
        return 0
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id: expected a value in [0, {num_processes}), got {process_id}")
    if coordinator is None:
        raise ValueError("coordinator: expected 'host:port' when num_processes > 1")
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        **kwargs,
    )
    return jax.process_index()


def _cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def use_cpu_devices(count: int | str | None) -> int | None:
    """Splits the host CPU into ``count`` JAX devices (``jax_num_cpu_devices``).

    The raster pipelines and the sharded train step shard their windows / patches over the
    local devices, and a CPU device runs the block-DFT routes and small products of dense
    prediction on about one core. So on an ``n``-core machine ``n`` CPU devices can put cores
    to work that one device leaves idle; the gain depends on the shapes
    (``benchmarks/RESULTS.md``, 2 cores: a dense-prediction raster 1.28-1.43x, the train step
    1.11-1.23x, the segmentation driver on 512^2 tiles none; self-epitomic LSR, whose large
    products already use every core, 0.82-0.97x). Must run before the first JAX computation
    (in a script: right after ``import jax``).

    Args:
      count: devices; ``"auto"``: one per core this process may run on; ``None``: leave
        JAX's default (one CPU device, or what ``XLA_FLAGS`` forces).

    Returns:
      The CPU devices the process has or will have (``None`` for ``count=None``). Once JAX has
      started, ``"auto"`` keeps the devices it started with; another explicit count raises.
    """
    if count is None:
        return None
    if count == "auto":
        n = _cores()
    elif isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"cpu_devices: expected a positive integer, 'auto' or null, got {count!r}")
    else:
        n = int(count)
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # JAX has started: its CPU devices are fixed
        have = len(jax.devices("cpu"))
        if count == "auto" or have == n:
            return have
        raise ValueError(
            f"cpu_devices: JAX has already started with {have} CPU devices, expected {n}; set "
            "it before the first JAX computation (in a script: right after import jax)"
        ) from None
    return n
