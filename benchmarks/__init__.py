"""Benchmarks (not tests): python -m benchmarks.<name>."""
