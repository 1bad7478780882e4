"""Benchmarks: each prints a table and writes JSON under ``results/bench/`` (``python -m experiments.bench.<name>``)."""
