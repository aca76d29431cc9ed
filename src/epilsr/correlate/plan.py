"""The correlation plan: the cost model and memory budgets of the routes, as data.

A :class:`CorrelationPlan` holds everything that is tuned to a machine rather than derived:
how ``route="auto"`` weighs the routes against each other (fitted constants) and how large the
pieces are that the routes and the self-epitomic posteriors work in (byte budgets). The fitted
plans ship as package data (``plans.json``, one entry per platform), written by

    python -m benchmarks.correlate_crossover --write

on the machine to fit (see ``benchmarks/RESULTS.md`` for the timings behind the shipped CPU
entry). :func:`plan_for` picks the plan for the platform the arrays live on; a platform without
a fitted entry (a GPU, a TPU) gets the CPU cost model *without* the CPU-only memory rules
(column groups, small batch chunks), which on an accelerator would only serialise work.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from importlib import resources

import jax

__all__ = ["CorrelationPlan", "plan_for", "default_plan", "fitted_plans"]


@dataclasses.dataclass(frozen=True)
class CorrelationPlan:
    """Cost model and memory budgets of the correlation routes (frozen, hashable: a static
    argument under ``jit``). Derive variants with :func:`dataclasses.replace`.

    Memory budgets:
      chunk_bytes: intermediates per batch chunk of the two block-DFT routes.
      column_group_bytes: temporaries per column group of ``"dft_rows"``; ``None``: all column
        blocks at once (no groups). On the CPU, pieces under glibc's mmap threshold are reused
        from the heap instead of page-faulted afresh at every call.
      dft_2d_batch: patches per batch chunk of ``"dft_2d"`` (its per-frequency products run best
        with few patch columns on the CPU); ``None``: only ``chunk_bytes`` bounds the chunks.
      unfold_bytes: unfolded epitome windows (``4 S K^2 C`` bytes) the self-epitomic posterior
        may build before it falls back to correlations.
      unfold_batch_floats, unfold_batch_max: patches per posterior batch of the unfolded
        (matrix-product) self-epitomic route: ``[batch, S]`` under this many floats, at most max.
      correlate_batch_floats, correlate_batch_max: the same for its correlation route.

    Route choice of ``route="auto"`` (see :func:`epilsr.correlate.choose_route`):
      direct_ratio: ``"direct"`` while its flops are at most this multiple of ``"dft_rows"``'s.
      float_cost: flops charged per float moved through memory in ``"dft_2d"``'s cost model.
      dft_rows_cost, dft_rows_cost_large: ``"dft_2d"`` is taken while its modelled cost is
        below this multiple of ``"dft_rows"``'s flops (maps under / at least ``large_maps``
        positions).
      large_maps: positions ``N1 N2`` from which ``dft_rows_cost_large`` applies.
    """

    platform: str
    chunk_bytes: int
    column_group_bytes: int | None
    dft_2d_batch: int | None
    unfold_bytes: int
    unfold_batch_floats: int
    unfold_batch_max: int
    correlate_batch_floats: int
    correlate_batch_max: int
    direct_ratio: float
    float_cost: float
    dft_rows_cost: float
    dft_rows_cost_large: float
    large_maps: int

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "platform":
                if not isinstance(value, str) or not value:
                    raise ValueError(f"platform: expected a platform name, got {value!r}")
            elif value is None and field.name in ("column_group_bytes", "dft_2d_batch"):
                continue
            elif isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{field.name}: expected a positive number, got {value!r}")


_PLANS_FILE = "plans.json"


@functools.cache
def fitted_plans() -> dict[str, CorrelationPlan]:
    """The fitted plans shipped with the package (``plans.json``), by platform."""
    text = resources.files(__package__).joinpath(_PLANS_FILE).read_text()
    entries = json.loads(text)
    return {name: plan_from_dict(entry["plan"], name) for name, entry in entries.items()}


def plan_from_dict(fields: dict, platform: str) -> CorrelationPlan:
    """A plan from its JSON fields (``platform`` is the entry's key); unknown or missing fields
    are errors that name them."""
    names = {f.name for f in dataclasses.fields(CorrelationPlan)} - {"platform"}
    unknown, missing = set(fields) - names, names - set(fields)
    if unknown or missing:
        raise ValueError(
            f"{_PLANS_FILE} [{platform}]: unknown fields {sorted(unknown)}, "
            f"missing fields {sorted(missing)}"
        )
    return CorrelationPlan(platform=platform, **fields)


def plan_to_dict(plan: CorrelationPlan) -> dict:
    """The JSON fields of ``plan`` (without the platform, which is the entry's key)."""
    fields = dataclasses.asdict(plan)
    del fields["platform"]
    return fields


def default_plan(platform: str) -> CorrelationPlan:
    """The fitted plan of ``platform``, else the CPU cost model without CPU-only chunking."""
    plans = fitted_plans()
    if platform in plans:
        return plans[platform]
    return dataclasses.replace(
        plans["cpu"], platform=platform, column_group_bytes=None, dft_2d_batch=None
    )


def array_platform(*arrays) -> str:
    """The platform of the devices the concrete ``arrays`` live on; for tracers and host
    arrays, that of ``jax.default_device`` when set, else the default backend."""
    platforms = set()
    for x in arrays:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            platforms |= {d.platform for d in x.devices()}
    if len(platforms) > 1:
        raise ValueError(f"arrays: expected one platform, got arrays on {sorted(platforms)}")
    if platforms:
        return platforms.pop()
    device = jax.config.jax_default_device
    if isinstance(device, str):
        return device
    if device is not None:
        return device.platform
    return jax.default_backend()


def plan_for(*arrays, platform: str | None = None) -> CorrelationPlan:
    """The default :class:`CorrelationPlan` for the platform ``arrays`` live on (see
    :func:`array_platform`), or for ``platform`` when given (e.g. ``"gpu"``)."""
    return default_plan(array_platform(*arrays) if platform is None else platform)
