"""Shim: ``python -m experiments.lsr`` (from the repository) is :mod:`epilsr.cli.lsr`
(installed: ``epilsr-lsr``)."""

import sys

from epilsr.cli import lsr as _module

if __name__ == "__main__":
    _module.main()
else:  # the same module object: its private names and monkeypatching reach the real one
    sys.modules[__name__] = _module
