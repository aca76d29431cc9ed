"""Datasets and data utilities for epilsr."""
