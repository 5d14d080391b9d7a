"""Throughput benchmarks (`make bench`, `bash benchmarks/gpu.sh`); results in BENCHMARKS.md. Not installed."""
