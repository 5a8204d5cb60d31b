"""Benchmark suites and their report generator; see bench/README.md."""
