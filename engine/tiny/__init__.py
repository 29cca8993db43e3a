"""Tiny AuraFlow models made locally: the random pipelines of the test suite and the benchmarks,
and the one trained here on a world of shapes (renderer, grader, trainer, shipped weights, demo)."""
