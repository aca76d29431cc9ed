"""The drivers' Hydra configs (a package so that Hydra finds them installed: pkg://)."""
