"""Shim: ``experiments.common`` is :mod:`epilsr.cli.common`."""

import sys

from epilsr.cli import common as _module

sys.modules[__name__] = _module  # the same module object (private names, monkeypatching)
