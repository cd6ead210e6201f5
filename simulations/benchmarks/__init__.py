"""Benchmarks (`make bench`, BENCHMARKS.md): the measurements behind the numbers in the README, not product code."""
