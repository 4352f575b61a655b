"""Benchmarks of lookahead_fused: `python -m bench` (the table) and `pytest bench/ --benchmark-only`."""
