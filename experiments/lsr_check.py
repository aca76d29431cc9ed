"""Shim: ``python -m experiments.lsr_check <run dir>`` (from the repository) is
:mod:`epilsr.cli.lsr_check` (installed: ``epilsr-lsr-check``)."""

import sys

from epilsr.cli import lsr_check as _module

if __name__ == "__main__":
    sys.exit(_module.main())
else:  # the same module object: its private names and monkeypatching reach the real one
    sys.modules[__name__] = _module
