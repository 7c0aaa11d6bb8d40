"""Benchmarks: `python -m bench.run` (make bench). See docs/BENCHMARKS.md."""
