"""Benchmarks: run as modules, e.g. ``python -m benchmarks.bench_index --quick``."""
