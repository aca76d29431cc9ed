"""Shim: ``experiments.lsr_geotiff`` is :mod:`epilsr.cli.lsr_geotiff`."""

import sys

from epilsr.cli import lsr_geotiff as _module

sys.modules[__name__] = _module  # the same module object (private names, monkeypatching)
