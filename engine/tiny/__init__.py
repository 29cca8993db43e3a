"""Tiny AuraFlow pipelines made locally (nothing downloaded): the demo, the test suite and the benchmarks."""
