"""Hydra drivers: ``python -m experiments.<name>``. They turn configs into keyword arguments."""
