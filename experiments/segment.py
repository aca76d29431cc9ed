"""Shim: ``python -m experiments.segment`` (from the repository) is :mod:`epilsr.cli.segment`
(installed: ``epilsr-segment``)."""

import sys

from epilsr.cli import segment as _module

if __name__ == "__main__":
    _module.main()
else:  # the same module object: its private names and monkeypatching reach the real one
    sys.modules[__name__] = _module
