"""Shim: ``python -m experiments.train`` (from the repository) is :mod:`epilsr.cli.train`
(installed: ``epilsr-train``)."""

import sys

from epilsr.cli import train as _module

if __name__ == "__main__":
    _module.main()
else:  # the same module object: its private names and monkeypatching reach the real one
    sys.modules[__name__] = _module
