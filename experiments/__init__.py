"""Shims for ``python -m experiments.<name>`` from the repository; the drivers live in
:mod:`epilsr.cli` (installed as ``epilsr-lsr``, ``epilsr-train``, ``epilsr-segment``,
``epilsr-til``)."""
