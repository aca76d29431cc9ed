"""Installed commands (Hydra drivers): ``epilsr-lsr``, ``epilsr-train``, ``epilsr-segment``,
``epilsr-til``. They turn configs (packaged in ``epilsr/cli/conf``) into keyword arguments; the
top layer, it may import every other one and none imports it. Needs ``epilsr[experiments]``."""
