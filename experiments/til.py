"""Shim: ``python -m experiments.til`` (from the repository) is :mod:`epilsr.cli.til`
(installed: ``epilsr-til``)."""

import sys

from epilsr.cli import til as _module

if __name__ == "__main__":
    _module.main()
else:  # the same module object: its private names and monkeypatching reach the real one
    sys.modules[__name__] = _module
