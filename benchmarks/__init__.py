"""Throughput benchmarks for issue 6 (`make bench`); see BENCHMARKS.md. Not part of the installed package."""
